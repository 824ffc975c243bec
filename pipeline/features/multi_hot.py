"""Multi-hot: a list column (genres, tags) as a bag of vocabulary ids, pooled."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.features.base import Encoded, FeatureConfig, InputForm, KindSpec, is_list_of, one_row
from pipeline.state import RESERVED, FeatureKind, FeatureState, Pooling, fit_vocab
from pipeline.transforms import encode_bag


class MultiHotFeature(FeatureConfig):
    """A list column (e.g. genres, tags): a bag of vocabulary ids, padded to max_length."""

    type: Literal["multi_hot"] = Field(default="multi_hot", description="The feature kind.")
    min_count: int = Field(default=1, ge=1, description="Values seen fewer times go to OOV.")
    max_length: int = Field(default=8, ge=1, description="Values kept per row (padded with 0).")
    embedding_dim: int = Field(default=16, ge=1, description="Embedding width.")
    pooling: Pooling = Field(default=Pooling.MEAN, description="Bag pooling.")


def fit_bag(kind: FeatureKind, feat: Any, values: pa.Array, max_vocab: int | None,
            max_length: int) -> FeatureState:
    """The state of a bag feature (multi-hot values, text tokens) from its flat values.

    Args:
        kind: the bag's kind.
        feat: its config (``min_count``, ``embedding_dim``, ``pooling``).
        values: [T] every row's values back to back.
        max_vocab: keep the most frequent N (None: all).
        max_length: values kept per row.
    """
    vocab, vtype = fit_vocab(values, feat.min_count, max_vocab)
    return FeatureState(type=kind, source=feat.source, vocab=vocab, vocab_type=vtype,
                        max_length=max_length, num_embeddings=len(vocab) + RESERVED,
                        pooling=feat.pooling, embedding_dim=feat.embedding_dim)


def _fit(feat: MultiHotFeature, values: pa.Array) -> FeatureState:
    return fit_bag(FeatureKind.MULTI_HOT, feat, values, None, feat.max_length)


def _encode(values: Any, state: FeatureState, name: str) -> Encoded:
    return {name: encode_bag(values, state)}


SPEC = KindSpec(
    kind=FeatureKind.MULTI_HOT, config=MultiHotFeature, form=InputForm.BAG,
    fit=_fit, encode=_encode, fit_input=pc.list_flatten,
    null_array=lambda state: pa.nulls(1, pa.list_(state.vocab_arrow_type())),
    raw_value=lambda value, state: one_row(value, state, takes_list=True),
    accepts=lambda typ: is_list_of(typ, pa.types.is_integer, pa.types.is_string),
    accepted="list<string> or list<integer>",
    request=lambda state, types: Annotated[list[types.key], Field(max_length=types.max_values)],
    filterable=True,
)
