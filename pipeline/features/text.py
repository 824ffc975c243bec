"""Text: a string column tokenised into a bag of token ids, pooled."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from pipeline.features.base import Encoded, FeatureConfig, InputForm, KindSpec, one_row
from pipeline.features.multi_hot import fit_bag
from pipeline.state import FeatureKind, FeatureState, Pooling
from pipeline.transforms import encode_text, tokenize


class TextFeature(FeatureConfig):
    """A string column tokenised (lower-cased, split on non-alphanumerics) into token ids."""

    type: Literal["text"] = Field(default="text", description="The feature kind.")
    min_count: int = Field(default=2, ge=1, description="Tokens seen fewer times go to OOV.")
    max_tokens: int = Field(default=16, ge=1, description="Tokens kept per row.")
    max_vocab: int | None = Field(default=50_000, ge=1, description="Keep the most frequent N.")
    embedding_dim: int = Field(default=16, ge=1, description="Embedding width.")
    pooling: Pooling = Field(default=Pooling.MEAN, description="Bag pooling.")


def _tokens(column: pa.Array) -> pa.Array:
    return pc.list_flatten(tokenize(column))


def _fit(feat: TextFeature, values: pa.Array) -> FeatureState:
    return fit_bag(FeatureKind.TEXT, feat, values, feat.max_vocab, feat.max_tokens)


def _encode(values: Any, state: FeatureState, name: str) -> Encoded:
    return {name: encode_text(values, state)}


def _accepts(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ)


SPEC = KindSpec(
    kind=FeatureKind.TEXT, config=TextFeature, form=InputForm.BAG,
    fit=_fit, encode=_encode, fit_input=_tokens,
    null_array=lambda state: pa.nulls(1, pa.string()),
    raw_value=lambda value, state: one_row(value, state, takes_list=False, typ=pa.string()),
    accepts=_accepts, accepted="string",
    request=lambda state, types: types.text,
)
