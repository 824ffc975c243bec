"""The ``sequence`` section: train the user tower at every position of each user's sequence.

Without an ``objective`` training is one row per interaction (the history pooled into one
user vector for one target). With one, prepare also writes each user's training items as
windows (``prepared/sequences/``) and the loss is computed at every position of every
window in one forward pass (Transformers4Rec's objectives):

- ``clm`` (causal): position t sees items up to t and predicts item t + 1;
- ``mlm`` (masked, BERT4Rec): a fraction of positions is replaced by a mask token and
  predicted from both sides; at inference a mask token is appended after the last item.

Candidates are the whole catalogue embedded by the item tower (full softmax) when it has
at most ``full_softmax_max_items`` items, else every position's positive (gathered from all
workers) plus ``loss.extra_negatives`` shared sampled negatives (sampled softmax with log-Q
correction and accidental-hit masking, the ``loss`` section's settings).
"""

from __future__ import annotations

import enum
from typing import Literal

from pydantic import Field

from pipeline.strict import StrictModel


class Objective(str, enum.Enum):
    """What each position of a training sequence predicts."""

    CLM = "clm"  # causal: the next item
    MLM = "mlm"  # masked: the masked item, from both sides


class Candidates(str, enum.Enum):
    """Which items each position is scored against."""

    AUTO = "auto"  # full below full_softmax_max_items, else sampled
    FULL = "full"  # the whole catalogue through the item tower, every step
    SAMPLED = "sampled"  # in-batch positives + loss.extra_negatives shared negatives


class SequenceConfig(StrictModel):
    """The sequence training mode (absent ``objective``: one row per interaction)."""

    objective: Objective | None = Field(
        default=None, description="clm or mlm: train at every position of each user's "
        "sequence; null: one row per interaction (MLP towers, data without order)."
    )
    feature: str | None = Field(
        default=None, description="The user sequence feature the windows are cut from and "
        "the body runs over; default: the user tower's only sequence feature."
    )
    window_stride: int | None = Field(
        default=None, ge=1, description="Items between the ends of a user's consecutive "
        "training windows; null: the history's max_length (windows share one item, every "
        "transition is trained once). Smaller strides overlap the windows: each transition "
        "is trained about max_length / stride times, with more of its past in view, at "
        "that multiple of the epoch's cost."
    )
    shuffle_ties: bool = Field(
        default=False, description="Reorder each training window's items at random, every "
        "epoch, within runs of equal timestamps. The split orders ties by input row; set "
        "true when the rows' order within a timestamp is not the order of events (e.g. "
        "MovieLens' u.data, shuffled, with rating bursts in one second)."
    )
    exclude_seen: bool = Field(
        default=False, description="Leave out of each position's candidates the items "
        "of its window it can see (its own target never), as serving's exclude_seen and "
        "the masked metrics leave out the user's history."
    )
    length_pools: bool | Literal["auto"] = Field(
        default="auto", description="Draw each batch from a pool of windows sorted by length "
        "(64 batches a pool, the batches shuffled), so that a batch of short histories cuts "
        "the padding its windows share: several times faster where most histories are far "
        "shorter than the history's max_length (shopping data). Off: plain random batches. "
        "auto: on when the data's median history (prepare's manifest) is under a quarter of "
        "the windows' max_length, logged at the start of training."
    )
    mask_probability: float = Field(
        default=0.2, gt=0.0, lt=1.0, description="mlm: fraction of positions masked."
    )
    candidates: Candidates = Field(
        default=Candidates.AUTO, description="auto, full (whole catalogue) or sampled."
    )
    full_softmax_max_items: int = Field(
        default=4_096, ge=1, description="auto: full softmax up to this many catalogue "
        "items, sampled softmax above (a full step costs as much as a sampled one at about "
        "3,000-4,000 items: results/sequence_candidates-to-50k-items.json)."
    )

    @property
    def enabled(self) -> bool:
        """True when training runs over sequences (an objective is set)."""
        return self.objective is not None
