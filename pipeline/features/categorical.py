"""Categorical: a single value per row (ids included) mapped to one embedding row."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from pipeline.features.base import (
    Encoded,
    FeatureConfig,
    InputForm,
    KindSpec,
    is_scalar_key,
    one_row,
)
from pipeline.state import RESERVED, FeatureKind, FeatureState, fit_vocab
from pipeline.transforms import hash_bucket, lookup, vocab_index


class CategoricalFeature(FeatureConfig):
    """A single value per row (ids included) mapped to an embedding row."""

    type: Literal["categorical"] = Field(default="categorical", description="The feature kind.")
    min_count: int = Field(default=1, ge=1, description="Values seen fewer times go to OOV.")
    max_vocab: int | None = Field(default=None, ge=1, description="Keep the most frequent N.")
    hash_buckets: int | None = Field(
        default=None, ge=1, description="Hash values into N buckets instead of a vocabulary."
    )
    embedding_dim: int = Field(default=16, ge=1, description="Embedding width.")

    @model_validator(mode="after")
    def _hash_or_vocab(self) -> CategoricalFeature:
        if self.hash_buckets is not None and (self.min_count != 1 or self.max_vocab):
            raise ValueError(
                f"feature {self.name!r}: hash_buckets={self.hash_buckets} cannot be combined "
                f"with min_count={self.min_count} or max_vocab={self.max_vocab} (no vocabulary "
                "is fitted when hashing)"
            )
        return self


def _fit(feat: CategoricalFeature, values: pa.Array | None) -> FeatureState:
    base = {"type": FeatureKind.CATEGORICAL, "source": feat.source,
            "embedding_dim": feat.embedding_dim}
    if feat.hash_buckets:
        return FeatureState(**base, hash_buckets=feat.hash_buckets,
                            num_embeddings=feat.hash_buckets + RESERVED)
    vocab, vtype = fit_vocab(values, feat.min_count, feat.max_vocab)
    return FeatureState(**base, vocab=vocab, vocab_type=vtype,
                        num_embeddings=len(vocab) + RESERVED)


def _encode(values: Any, state: FeatureState, name: str) -> Encoded:
    if state.hash_buckets:
        return {name: hash_bucket(values, state.hash_buckets)}
    return {name: lookup(values, vocab_index(state))}


def _accepts(typ: pa.DataType) -> bool:
    return is_scalar_key(typ) or pa.types.is_boolean(typ)


SPEC = KindSpec(
    kind=FeatureKind.CATEGORICAL, config=CategoricalFeature, form=InputForm.ID,
    fit=_fit, encode=_encode,
    null_array=lambda state: pa.nulls(1, state.vocab_arrow_type()),
    # the type is inferred, not the vocabulary's: "7" finds id 7, "x" is simply unseen
    raw_value=lambda value, state: one_row(value, state, takes_list=False),
    accepts=_accepts, accepted="integer, string or bool",
    request=lambda state, types: types.key, filterable=True,
)
