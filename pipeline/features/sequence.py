"""Sequence: the user's most recent item ids, built from the interactions (user tower only).

A sequence has no column in a table (``accepts`` is None): the prepare step derives each
row's history from the interactions and :func:`fit_history` fits its vocabulary. Its raw
value is a list of item ids, oldest first.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.features.base import Encoded, FeatureConfig, InputForm, KindSpec, one_row
from pipeline.state import RESERVED, FeatureKind, FeatureState, TowerState, fit_vocab
from pipeline.transforms import encode_sequence, vocab_index


class SequenceFeature(FeatureConfig):
    """The user's most recent item ids, derived from the interactions (user tower only)."""

    type: Literal["sequence"] = Field(default="sequence", description="The feature kind.")
    max_length: int = Field(default=50, ge=1, description="Most recent items kept.")
    item_features: list[str] = Field(
        default_factory=list,
        description="Categorical item-tower features also looked up for each history item.",
    )
    embedding_dim: int = Field(default=32, ge=1, description="Item embedding width.")


def _fit(feat: SequenceFeature, item_ids: pa.Array) -> FeatureState:
    """A vocabulary of its own over the item ids seen in training."""
    vocab, vtype = fit_vocab(item_ids, 1, None)
    return FeatureState(type=FeatureKind.SEQUENCE, source=feat.name, vocab=vocab,
                        vocab_type=vtype, num_embeddings=len(vocab) + RESERVED,
                        max_length=feat.max_length, embedding_dim=feat.embedding_dim,
                        item_features=list(feat.item_features))


def fit_history(feat: SequenceFeature, item_ids: pa.Array, item_tower: TowerState,
                item_id_column: str) -> FeatureState:
    """A sequence shares the vocabulary of the item tower's id feature when there is one.

    Sharing makes the history ids and the item tower's id embedding index the same rows,
    which is what tying the two embeddings needs.

    Args:
        feat: the sequence's config.
        item_ids: [N] item ids of the training interactions.
        item_tower: the fitted item tower.
        item_id_column: the item key column.
    """
    for name, st in item_tower.features.items():
        if (st.type is FeatureKind.CATEGORICAL and st.source == item_id_column
                and st.vocab is not None):
            return FeatureState(type=FeatureKind.SEQUENCE, source=feat.name, vocab=st.vocab,
                                vocab_type=st.vocab_type, num_embeddings=st.num_embeddings,
                                max_length=feat.max_length, embedding_dim=feat.embedding_dim,
                                item_features=list(feat.item_features), vocab_of=name)
    return _fit(feat, item_ids)


def _encode(histories: Any, state: FeatureState, name: str) -> Encoded:
    """[B] raw id lists -> the history ids only; item features need the catalogue."""
    return {name: encode_sequence(histories, vocab_index(state), state.max_length)}


SPEC = KindSpec(
    kind=FeatureKind.SEQUENCE, config=SequenceFeature, form=InputForm.SEQUENCE,
    fit=_fit, encode=_encode, fit_input=pc.list_flatten,
    null_array=lambda state: pa.nulls(1, pa.list_(state.vocab_arrow_type())),
    raw_value=lambda value, state: one_row(value, state, takes_list=True),
)
