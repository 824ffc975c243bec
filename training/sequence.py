"""The sequence training task: the loss at every position of every window, in one forward.

A batch is B windows of ``prepared/sequences/`` (:func:`prepare.rows.build_sequence_rows`):
the user's static features, the history columns over ``L + 1`` items and each item's
catalogue row (:data:`~pipeline.columns.SEQUENCE_ITEMS`, -1 = padding) and weight. The
objective (``sequence.objective``) decides what the user tower sees and what each position
predicts (:func:`positions_of`):

- ``clm``: inputs are items ``0 .. L-1``, position t predicts item t + 1 (causal body);
- ``mlm``: inputs are items ``1 .. L``; a ``mask_probability`` share of the real positions
  (and, with the same probability, the last one, as at inference) is replaced by the mask
  token, and each masked position predicts its own item.

Candidates are the whole catalogue through the item tower (full softmax, no sampling so no
log-Q) or, above ``sequence.full_softmax_max_items``, every position's positive gathered
from all workers plus ``loss.extra_negatives`` shared negatives, exactly the interaction
mode's sampled softmax (:class:`~training.task.RetrievalTask`) with positions as rows.

Two options shape what a batch teaches: ``sequence.shuffle_ties`` reorders items that share
a timestamp at random each epoch (:func:`shuffle_ties`), and ``sequence.exclude_seen``
leaves each position's already-seen items out of its softmax (:func:`seen_mask`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.columns import (
    SEQUENCE_ITEMS,
    SEQUENCE_TIMES,
    SEQUENCE_WEIGHTS,
    USER,
    column_name,
    tower_inputs,
)
from pipeline.config import Config
from pipeline.config.sequence import Candidates, Objective, SequenceConfig
from training.distributed import world_info
from training.losses import retrieval_loss
from training.task import RetrievalTask, global_normaliser


class SequenceTrainModule(nn.Module):
    """What DDP wraps in the sequence mode: one forward computes every tensor of the loss.

    DDP synchronises gradients of parameters used inside ``forward``, so the user tower's
    positions, the item tower's candidates, the temperature and the regulariser are all
    computed here.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, user: Mapping[str, torch.Tensor], masked: torch.Tensor | None,
                items: Mapping[str, torch.Tensor],
                extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Compute the tensors of one batch's loss.

        Args:
            user: the user tower's inputs, [B, ...] each (the history [B, L]).
            masked: [B, L] bool positions whose input is the mask token (mlm), or None.
            items: item inputs of the candidates: the whole catalogue [I, ...] (full
                softmax) or the positives of the trained positions [P, ...] (sampled).
            extra: item inputs of the shared sampled negatives [M, ...], or None.

        Returns:
            ``positions`` [B, L, D], ``items`` [I or P, D], ``extra`` [M, D] (or None),
            the scalar ``temperature`` and the scalar regulariser ``reg``.
        """
        return {"positions": self.model.encode_user_positions(dict(user), masked),
                "items": self.model.encode_item(dict(items)),
                "extra": self.model.encode_item(dict(extra)) if extra else None,
                "temperature": self.model.temperature(),
                "reg": self.model.regularization_loss()}


class Positions(NamedTuple):
    """What one batch trains: the tower's inputs and, per position, the target."""

    inputs: dict[str, torch.Tensor]  # user-tower inputs, the history cut to [B, L]
    masked: torch.Tensor | None  # [B, L] bool mask-token positions (mlm), else None
    targets: torch.Tensor  # [B, L] catalogue row each position predicts (-1: none)
    seen: torch.Tensor  # [B, L] catalogue row of each input position's item (-1: padding)
    trained: torch.Tensor  # [B, L] bool positions with a loss
    weights: torch.Tensor  # [B, L] float32 weight of each position's target


def positions_of(batch: Mapping[str, torch.Tensor], history_keys: frozenset[str],
                 objective: Objective, mask_probability: float = 0.2,
                 generator: torch.Generator | None = None) -> Positions:
    """Cut a batch of ``L + 1``-item windows into the objective's inputs and targets.

    Args:
        batch: prepared ``sequences/`` columns as tensors: ``user__*`` (the history
            columns [B, L + 1]), :data:`SEQUENCE_ITEMS` and :data:`SEQUENCE_WEIGHTS`.
        history_keys: the user-tower input keys of the history (``history`` and its item
            features), the ones cut to L positions.
        objective: clm or mlm.
        mask_probability: mlm: share of real positions masked.
        generator: CPU generator of the mlm masks (seeded per worker).

    Returns:
        The :class:`Positions`: clm trains every position whose input and next item are
        real; mlm trains the masked positions.
    """
    inputs = tower_inputs(batch, USER)
    items = batch[SEQUENCE_ITEMS].long()  # [B, L + 1]
    weights = batch[SEQUENCE_WEIGHTS].float()
    window = slice(None, -1) if objective is Objective.CLM else slice(1, None)
    inputs = {k: v[:, window] if k in history_keys else v for k, v in inputs.items()}
    targets = items[:, 1:]  # clm: the next item; mlm: the position's own item
    seen = items[:, window]
    if objective is Objective.CLM:
        return Positions(inputs, None, targets, seen, (seen >= 0) & (targets >= 0),
                         weights[:, 1:])
    real = targets >= 0
    draw = torch.rand(targets.shape, generator=generator).to(targets.device)
    last = torch.rand(targets.shape[0], generator=generator).to(targets.device)
    masked = (draw < mask_probability) & real
    masked[:, -1] |= (last < mask_probability) & real[:, -1]  # as at inference
    return Positions(inputs, masked, targets, seen, masked, weights[:, 1:])


def trim_padding(p: Positions, history_keys: frozenset[str]) -> Positions:
    """Cut the leading columns that are padding in every window of the batch.

    Histories are padded in front and a real position never attends to padding, so the
    positions left compute exactly what they computed before; the transformer's learned
    positions are taken from the right, as serving's forward does. A batch of short
    windows (the rule in shopping data) then costs its real positions, not ``L``.
    """
    real = (p.seen >= 0).any(0)  # [L] columns holding a real input item
    if p.masked is not None:
        real |= p.masked.any(0)
    start = min(int(real.float().argmax()), real.shape[0] - 1) if real.any() else \
        real.shape[0] - 1
    if start == 0:
        return p
    inputs = {k: v[:, start:] if k in history_keys else v for k, v in p.inputs.items()}
    cut = (None if p.masked is None else p.masked[:, start:])
    return Positions(inputs, cut, p.targets[:, start:], p.seen[:, start:],
                     p.trained[:, start:], p.weights[:, start:])


def shuffle_ties(batch: Mapping[str, torch.Tensor], history_keys: frozenset[str],
                 generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Reorder each window's items at random within runs of equal timestamps.

    The split orders a user's interactions by (timestamp, input row), so the order of items
    that share a timestamp is the order of the rows in the source files. Where that order
    is not the order of events (MovieLens' ``u.data`` is shuffled, and a rating burst
    shares one second), each epoch then sees another of the equally true orders instead
    of the same arbitrary one. Padding stays in front; items with distinct timestamps keep
    their order; every window column (the history and its item features, catalogue rows,
    weights, times) moves together.

    Args:
        batch: prepared ``sequences/`` columns as tensors (:data:`SEQUENCE_TIMES` among them).
        history_keys: the user-tower input keys of the history (:func:`history_keys`).
        generator: CPU generator of the draws (seeded per worker).

    Returns:
        The batch with its window columns permuted, the other columns as they were.
    """
    if SEQUENCE_TIMES not in batch:
        raise ValueError(f"sequence.shuffle_ties needs the {SEQUENCE_TIMES!r} column of "
                         "prepared/sequences/, which this run's prepare did not write; run "
                         "jobs.prepare again")
    times = batch[SEQUENCE_TIMES]  # [B, L + 1], nondecreasing per row
    real = batch[SEQUENCE_ITEMS] >= 0
    new_run = torch.ones_like(real)
    new_run[:, 1:] = (times[:, 1:] != times[:, :-1]) | (real[:, 1:] != real[:, :-1])
    run = new_run.long().cumsum(dim=1).double()  # [B, L + 1] run number, 1, 2, ...
    draw = torch.rand(times.shape, generator=generator, dtype=torch.float64)
    order = (run + draw.to(times.device)).argsort(dim=1)  # runs stay in place
    window = {column_name(USER, k) for k in history_keys} | {
        SEQUENCE_ITEMS, SEQUENCE_WEIGHTS, SEQUENCE_TIMES}
    out = dict(batch)
    for key in window & out.keys():
        value = out[key]
        index = order.reshape(order.shape + (1,) * (value.dim() - 2)).expand_as(value)
        out[key] = value.gather(1, index)
    return out


def seen_mask(window: torch.Tensor, candidate_ids: torch.Tensor, trained: torch.Tensor,
              positive_index: torch.Tensor, causal: bool) -> torch.Tensor:
    """[P, C] True where a trained position's candidate is an item its user already had.

    A position's seen items are those of its window it can see: with ``causal``, the
    items at positions up to its own (clm); otherwise every item of the window (mlm, as
    serving leaves out the whole history). Its positive's column is never masked (a
    repeat stays a positive). This is the training side of serving's ``exclude_seen`` and of
    the masked metrics: the loss spends no effort ranking items that are never shown.

    Args:
        window: [B, L] catalogue row at each input position (-1 = padding).
        candidate_ids: [C] catalogue row of each candidate column.
        trained: [B, L] bool positions with a loss (P of them, row-major).
        positive_index: [P] column of each trained position's positive.
        causal: position t sees items 0 .. t only.

    Returns:
        [P, C] bool.
    """
    b, length = window.shape
    ordered, place = torch.sort(window, dim=1, stable=True)  # padding (-1) first
    wanted = candidate_ids.expand(b, -1).contiguous()  # [B, C]
    at = torch.searchsorted(ordered, wanted).clamp(max=length - 1)  # first match (stable)
    found = ordered.gather(1, at) == wanted
    small = torch.int16 if length < torch.iinfo(torch.int16).max else torch.int64
    first = torch.where(found, place.gather(1, at), length).to(small)  # [B, C] first seen
    rows, cols = trained.nonzero(as_tuple=True)  # [P] window and position of each
    limit = cols if causal else torch.full_like(cols, length - 1)
    banned = first[rows] <= limit.to(small)[:, None]  # [P, C]
    banned[torch.arange(len(rows), device=banned.device), positive_index] = False
    return banned


def scores_full_catalogue(cfg: SequenceConfig, num_items: int) -> bool:
    """Whether a catalogue of ``num_items`` is scored in full (the one home of the rule)."""
    if cfg.candidates is Candidates.AUTO:
        return num_items <= cfg.full_softmax_max_items
    return cfg.candidates is Candidates.FULL


class SequenceTask(RetrievalTask):
    """Batch of windows -> loss at every trained position (full or sampled softmax, BCE, gBCE).

    Args:
        cfg: the whole config (``loss`` and ``sequence`` sections; ``data.weight``).
        item_counts: [I] training interactions per item (log-Q, popularity sampling).
        catalogue: encoded catalogue columns ``item__*`` as tensors, [I, ...] each.
        history_keys: the user-tower input keys of the trained history.
        seed: negatives and masks are drawn with ``seed + rank``.
    """

    def __init__(self, cfg: Config, item_counts: np.ndarray,
                 catalogue: Mapping[str, torch.Tensor], history_keys: frozenset[str],
                 seed: int):
        super().__init__(cfg.loss, item_counts, catalogue, seed,
                         weighted=cfg.data.weight is not None)
        rank, _ = world_info()
        self.objective = cfg.sequence.objective
        self.mask_probability = cfg.sequence.mask_probability
        self.shuffle_ties = cfg.sequence.shuffle_ties
        self.exclude_seen = cfg.sequence.exclude_seen
        self.full = scores_full_catalogue(cfg.sequence, self.sampler.num_items)
        self.history_keys = history_keys
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        # Every catalogue item is a candidate once: no sampling to correct, no duplicate.
        self.full_cfg = cfg.loss.model_copy(update={"mask_accidental_hits": False})

    def loss(self, module: nn.Module, batch: Mapping[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of one batch of windows and its parts (floats, for logging)."""
        if self.shuffle_ties:
            batch = shuffle_ties(batch, self.history_keys, self.generator)
        p = trim_padding(positions_of(batch, self.history_keys, self.objective,
                                      self.mask_probability, self.generator),
                         self.history_keys)
        device = p.targets.device
        targets = p.targets[p.trained]  # [P] catalogue rows
        if self.full:
            all_rows = torch.arange(self.sampler.num_items, device=device)
            out = module(p.inputs, p.masked, self._catalogue_rows(all_rows, device))
            query = out["positions"][p.trained]  # [P, D]
            log_q = torch.zeros(len(all_rows), device=device) if self.cfg.logq_correction \
                else None
            cfg, candidates, cand_ids, positive = self.full_cfg, out["items"], all_rows, targets
        else:
            extra, extra_ids, extra_log_q = self.extra_negatives(device)
            out = module(p.inputs, p.masked, self._catalogue_rows(targets, device), extra)
            query = out["positions"][p.trained]
            candidates, cand_ids, positive, log_q = self.candidates(
                out["items"], targets, out["extra"], extra_ids, extra_log_q)
            cfg = self.cfg
        weights = p.weights[p.trained] if self.weighted else torch.ones(len(query),
                                                                          device=device)
        weights, total = global_normaliser(weights)  # positions differ per rank
        banned = None
        if self.exclude_seen:
            banned = seen_mask(p.seen, cand_ids, p.trained, positive,
                               causal=self.objective is Objective.CLM)
        main = retrieval_loss(query, candidates, positive, cand_ids, cfg, out["temperature"],
                              candidate_log_q=log_q, weights=weights, weight_total=total,
                              num_items=self.sampler.num_items, banned=banned)
        reg = out["reg"]
        return main + self.cfg.variational_dropout_weight * reg, {
            "loss": float(main.detach()), "reg": float(reg.detach()),
            "temperature": float(out["temperature"].detach())}

    def samples(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Training examples in a batch: its windows' real positions with a next item."""
        items = batch[SEQUENCE_ITEMS]
        return int(((items[:, :-1] >= 0) & (items[:, 1:] >= 0)).sum())


def history_keys(model: nn.Module) -> frozenset[str]:
    """The user-tower input keys of the history its body runs over (ids, item features)."""
    tower = model.user_tower
    return frozenset(tower.encoder.inputs[tower.body.sequence].input_spec())
