"""Feature kinds: one module per kind, one :class:`KindSpec` per kind in :data:`REGISTRY`.

Everything that differs between kinds is in its module and reached through its registry
entry: the config model (``features`` section), fitting (:func:`fit_feature`, the
prepare step), encoding (:func:`encode_feature`, :func:`transform_tower`), the Arrow type check
(``prepare.tables``), the model input form (``towers.features`` maps a form to a module) and
the one-row arrays of a request (``serve_app.encode``). Adding a kind that reuses an input
form is one module and one entry::

    REGISTRY[MyKind.HOUR] = KindSpec(kind=MyKind.HOUR, config=HourFeature, ...)
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.features import categorical, dense_vector, multi_hot, numeric, sequence, text
from pipeline.features.base import (
    REGISTRY,
    FeatureConfig,
    InputForm,
    KindSpec,
    RequestTypes,
    spec_of,
)
from pipeline.kinds import FeatureKind, NumericTransform, Pooling
from pipeline.state import FeatureState, TowerState

REGISTRY.update({spec.kind: spec for spec in (
    categorical.SPEC, multi_hot.SPEC, text.SPEC, numeric.SPEC, dense_vector.SPEC,
    sequence.SPEC,
)})


def fit_feature(feat: FeatureConfig, values: pa.Array | None) -> FeatureState:
    """Fit one feature through its kind's registry entry.

    Args:
        feat: the feature's config.
        values: the prepared column: flattened lists for bags, tokens for text, item ids
            for a sequence (see ``KindSpec.fit_column`` for the raw column).
    """
    return spec_of(feat.type).fit(feat, values)


def encode_feature(values: Any, state: FeatureState, name: str) -> dict[str, np.ndarray]:
    """Encode one feature through its kind: ``{name: array}`` (+ e.g. ``name__missing``).

    Args:
        values: [B] raw values of the feature's column.
        state: the feature's fitted state.
        name: the feature name, the model input key.

    Returns:
        ``{input key: [B, ...] array}``.
    """
    return spec_of(state.type).encode(values, state, name)


def transform_tower(
    batch: Mapping[str, Any], tower: TowerState, skip: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Encode every table-backed feature of a tower from a batch of raw columns.

    Args:
        batch: raw columns by source column name ([B] each; lists for bag features).
        tower: the tower's fitted state.
        skip: feature names not to encode (e.g. sequences, built from interactions).

    Returns:
        ``{feature name (+ "__missing"): [B, ...] array}``.
    """
    out: dict[str, np.ndarray] = {}
    for name, st in tower.features.items():
        if not spec_of(st.type).table_column or name in skip:  # e.g. a sequence
            continue
        if st.source not in batch:
            raise ValueError(f"feature {name!r}: column {st.source!r} missing from the batch")
        out.update(encode_feature(batch[st.source], st, name))
    return out


__all__ = ["REGISTRY", "FeatureConfig", "FeatureKind", "InputForm", "KindSpec", "RequestTypes",
           "NumericTransform", "Pooling", "encode_feature", "fit_feature", "spec_of",
           "transform_tower"]
