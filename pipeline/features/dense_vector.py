"""Dense vector: a fixed-length pretrained embedding column, projected by the tower."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pyarrow as pa
from pydantic import Field

from pipeline.features.base import Encoded, FeatureConfig, InputForm, KindSpec, is_list_of, one_row
from pipeline.state import FeatureKind, FeatureState
from pipeline.transforms import encode_dense

_RAW = pa.list_(pa.float32())


class DenseVectorFeature(FeatureConfig):
    """A fixed-length pretrained embedding column (list<float> of length `dim`)."""

    type: Literal["dense_vector"] = Field(default="dense_vector", description="The feature kind.")
    dim: int = Field(ge=1, description="Expected vector length; other lengths are an error.")


def _fit(feat: DenseVectorFeature, values: pa.Array | None) -> FeatureState:
    return FeatureState(type=FeatureKind.DENSE_VECTOR, source=feat.source, dim=feat.dim)


def _encode(values: Any, state: FeatureState, name: str) -> Encoded:
    return {name: encode_dense(values, state, name)}


SPEC = KindSpec(
    kind=FeatureKind.DENSE_VECTOR, config=DenseVectorFeature, form=InputForm.VECTOR,
    fit=_fit, encode=_encode,
    null_array=lambda state: pa.nulls(1, _RAW),
    raw_value=lambda value, state: one_row(value, state, takes_list=True, typ=_RAW),
    accepts=lambda typ: is_list_of(typ, pa.types.is_floating, pa.types.is_integer),
    accepted="list<float> (fixed length)",
    request=lambda state, types: Annotated[
        list[types.number], Field(min_length=state.dim, max_length=state.dim)],
)
