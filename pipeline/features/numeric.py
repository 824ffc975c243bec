"""Numeric: a scalar column standardised, log-scaled or bucketised; nulls filled and flagged."""

from __future__ import annotations

import enum
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from pipeline.columns import MISSING, input_key
from pipeline.errors import TableError
from pipeline.features.base import Encoded, FeatureConfig, InputForm, KindSpec, one_row
from pipeline.state import FeatureKind, FeatureState, NumericTransform
from pipeline.transforms import encode_numeric


class NullFill(str, enum.Enum):
    """Which value replaces a null numeric before the transform."""

    MEAN = "mean"
    MEDIAN = "median"
    ZERO = "zero"


class NumericFeature(FeatureConfig):
    """A scalar column: standardised, log-scaled or bucketised; nulls filled and flagged."""

    type: Literal["numeric"] = Field(default="numeric", description="The feature kind.")
    transform: NumericTransform = Field(
        default=NumericTransform.STANDARDIZE, description="standardize (z-score), log (log1p of "
        "max(x, 0), then z-score), bucketize (an embedded bucket id: quantiles or boundaries) "
        "or none (the value as is).")
    num_buckets: int = Field(default=10, ge=2, description="Quantile buckets for bucketize.")
    boundaries: list[float] | None = Field(
        default=None, description="Explicit sorted bucket boundaries (bucketize only)."
    )
    fill: NullFill = Field(default=NullFill.MEAN, description="Replacement for nulls.")
    missing_indicator: bool = Field(default=True, description="Add a 0/1 null flag input.")
    embedding_dim: int = Field(default=8, ge=1, description="Embedding width (bucketize).")

    @model_validator(mode="after")
    def _boundaries_need_bucketize(self) -> NumericFeature:
        if self.boundaries is not None:
            if self.transform is not NumericTransform.BUCKETIZE:
                raise ValueError(
                    f"feature {self.name!r}: boundaries are only used with transform=bucketize, "
                    f"not transform={self.transform.value}"
                )
            if list(self.boundaries) != sorted(set(self.boundaries)):
                raise ValueError(f"feature {self.name!r}: boundaries must be strictly increasing")
        return self


def _fit(feat: NumericFeature, values: pa.Array) -> FeatureState:
    x = pc.cast(values, pa.float64()).drop_null().to_numpy(zero_copy_only=False)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        raise TableError(f"column {feat.source!r} (numeric feature {feat.name!r}) has no "
                         "value: every row is null or not finite; accepted: at least one "
                         "finite number to fit its statistics")
    fill = {NullFill.MEAN: float(np.mean(x)), NullFill.MEDIAN: float(np.median(x)),
            NullFill.ZERO: 0.0}[feat.fill]
    filled = np.concatenate([x, np.full(len(values) - len(x), fill)])
    common = {"type": FeatureKind.NUMERIC, "source": feat.source, "transform": feat.transform,
              "fill_value": fill, "missing_indicator": feat.missing_indicator}
    if feat.transform is NumericTransform.BUCKETIZE:
        bounds = feat.boundaries or _quantile_bounds(filled, feat.num_buckets)
        return FeatureState(**common, boundaries=[float(b) for b in bounds],
                            num_embeddings=len(bounds) + 2, embedding_dim=feat.embedding_dim)
    if feat.transform is NumericTransform.LOG:
        filled = np.log1p(np.maximum(filled, 0.0))
    std = float(np.std(filled))
    return FeatureState(**common, mean=float(np.mean(filled)), std=std if std > 0 else 1.0)


def _quantile_bounds(x: np.ndarray, buckets: int) -> list[float]:
    qs = np.quantile(x, np.linspace(0, 1, buckets + 1)[1:-1])
    return sorted(set(float(q) for q in qs))


def _encode(values: Any, state: FeatureState, name: str) -> Encoded:
    value, missing = encode_numeric(values, state)
    out = {name: value}
    if state.missing_indicator:
        out[input_key(name, MISSING)] = missing
    return out


def _raw_value(value: Any, state: FeatureState) -> pa.Array:
    if isinstance(value, str):
        raise ValueError("a numeric feature takes a number, got a string")
    return one_row(value, state, takes_list=False, typ=pa.float64())


def _accepts(typ: pa.DataType) -> bool:
    t = pa.types
    return t.is_integer(typ) or t.is_floating(typ) or t.is_decimal(typ)


SPEC = KindSpec(
    kind=FeatureKind.NUMERIC, config=NumericFeature, form=InputForm.VALUE,
    fit=_fit, encode=_encode,
    null_array=lambda state: pa.nulls(1, pa.float64()), raw_value=_raw_value,
    accepts=_accepts, accepted="integer, float or decimal",
    request=lambda state, types: types.number,
)
