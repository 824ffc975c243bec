"""Feature kinds: every built-in kind's registry entry, and a new kind added as one entry.

The toy kind ``hour_of_day`` below is defined here and registered by the ``hour_kind``
fixture with a single ``REGISTRY`` item and nothing else patched; the config section, the
fit, the transforms, the Arrow type check, the towers and serving then all take it.
"""

from __future__ import annotations

import copy
import enum
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import Field, TypeAdapter

from pipeline import config as C
from pipeline import features as F
from pipeline import state
from pipeline import transforms as T
from pipeline.config.model import TowerConfig
from pipeline.features import REGISTRY, FeatureConfig, FeatureKind, InputForm, KindSpec
from pipeline.features.base import one_row
from pipeline.state import RESERVED, FeatureState, FeatureStateSet, TowerState
from prepare import tables
from serve_app.encode import raw_array
from tests.conftest import TINY_CONFIG
from towers.features import FORM_MODULES, CategoricalEmbedding, build_feature

# kind -> (extra config fields, a raw table column, an Arrow type it rejects, a request value)
SAMPLES: dict[FeatureKind, tuple[dict, pa.Array, pa.DataType | None, Any]] = {
    FeatureKind.CATEGORICAL: ({}, pa.array(["a", "b", "a", None]), pa.float64(), "b"),
    FeatureKind.MULTI_HOT: ({}, pa.array([["a"], ["b", "a"], None]), pa.string(), ["a", "z"]),
    FeatureKind.TEXT: ({"min_count": 1}, pa.array(["The cat", "a cat", None]),
                       pa.list_(pa.string()), "Cat"),
    FeatureKind.NUMERIC: ({}, pa.array([1.0, 3.0, None]), pa.string(), 2.5),
    FeatureKind.DENSE_VECTOR: ({"dim": 2}, pa.array([[1.0, 2.0], [3.0, 4.0], None],
                                                    pa.list_(pa.float32())),
                               pa.list_(pa.string()), [0.5, 0.25]),
    FeatureKind.SEQUENCE: ({}, pa.array([[10, 11], [11], []]), None, [11, 12]),
}


def fit_sample(kind: FeatureKind) -> tuple[KindSpec, FeatureState, pa.Array]:
    """Validate the sample config through the ``Feature`` union and fit it on its column."""
    fields, column, _, _ = SAMPLES[kind]
    feat = TypeAdapter(C.Feature).validate_python({"name": "f", "type": kind.value, **fields})
    spec = REGISTRY[kind]
    assert type(feat) is spec.config
    return spec, spec.fit_column(feat, column), column


@pytest.mark.parametrize("kind", list(FeatureKind))
def test_every_builtin_kind_provides_each_piece(kind):
    spec, st, column = fit_sample(kind)
    assert spec.kind is kind and st.type is kind and F.spec_of(st.type) is spec
    assert spec.config.model_fields["type"].default == kind.value
    # encode: one [B, ...] array per input key the form's module reads
    out = F.encode_feature(column, st, "f")
    assert all(len(v) == len(column) for v in out.values())
    module = build_feature("f", st, TowerConfig(), {}, {})
    assert type(module) is FORM_MODULES[spec.form]
    assert set(out) == set(module.input_spec())
    x = module({k: torch.from_numpy(v) for k, v in out.items()})
    assert x.shape[0] == len(column) and x.shape[-1] == module.output_dim()
    # serving: a null and a request value are one-row arrays that encode to one row
    raw = SAMPLES[kind][3]
    assert spec.raw_array(None, st).null_count == 1
    for one in (spec.raw_array(None, st), spec.raw_array(raw, st)):
        assert len(one) == 1
        assert all(len(v) == 1 for v in F.encode_feature(one, st, "f").values())
    # io: a table column's Arrow type check, or no table column (built from interactions)
    wrong = SAMPLES[kind][2]
    if kind is FeatureKind.SEQUENCE:
        assert not spec.table_column
    else:
        assert spec.accepts(column.type) and not spec.accepts(wrong) and spec.accepted


def test_state_json_keeps_enums_and_is_deterministic(tmp_path):
    feats = {k.value: fit_sample(k)[1] for k in FeatureKind}
    fitted = FeatureStateSet(TowerState(feats), TowerState({}), "user_id", "item_id")
    fitted.save(tmp_path / "s.json")
    loaded = FeatureStateSet.load(tmp_path / "s.json")
    assert loaded == fitted and loaded.to_json() == fitted.to_json()
    assert loaded.content_hash() == fitted.content_hash()
    assert loaded.user.features["text"].pooling is state.Pooling.MEAN
    assert loaded.user.features["numeric"].transform is state.NumericTransform.STANDARDIZE
    assert '"type": "dense_vector"' in fitted.to_json()


# ---------------------------------------------------------------- a kind added as one entry


class ToyKind(str, enum.Enum):
    HOUR_OF_DAY = "hour_of_day"


class HourOfDayFeature(FeatureConfig):
    """An hour 0-23: one embedding row per hour (other values are out of vocabulary)."""

    type: Literal["hour_of_day"] = "hour_of_day"
    embedding_dim: int = Field(default=4, ge=1, description="Embedding width.")


def _fit_hour(feat: HourOfDayFeature, values: pa.Array | None) -> FeatureState:
    return FeatureState(type=ToyKind.HOUR_OF_DAY, source=feat.source,
                        num_embeddings=24 + RESERVED, embedding_dim=feat.embedding_dim)


def _encode_hour(values: Any, st: FeatureState, name: str) -> dict[str, np.ndarray]:
    hours = pc.cast(T.as_arrow(values), pa.int64())
    h = hours.fill_null(-1).to_numpy(zero_copy_only=False)
    ids = np.where((h >= 0) & (h < 24), h + 2, T.OOV)
    ids[hours.is_null().to_numpy(zero_copy_only=False)] = T.PAD
    return {name: ids.astype(np.int64)}


HOUR_SPEC = KindSpec(
    kind=ToyKind.HOUR_OF_DAY, config=HourOfDayFeature, form=InputForm.ID,
    fit=_fit_hour, encode=_encode_hour,
    null_array=lambda st: pa.nulls(1, pa.int64()),
    raw_value=lambda value, st: one_row(value, st, takes_list=False, typ=pa.int64()),
    accepts=pa.types.is_integer, accepted="integer hour 0-23",
)


@pytest.fixture
def hour_kind(monkeypatch):
    """Register the toy kind: the single change (undone after the test)."""
    monkeypatch.setitem(REGISTRY, ToyKind.HOUR_OF_DAY, HOUR_SPEC)
    return HOUR_SPEC


def hour_config(embedding_dim: int = 3) -> C.Config:
    raw = copy.deepcopy(TINY_CONFIG)
    raw["features"]["user"].append({"name": "hour", "type": "hour_of_day",
                                    "embedding_dim": embedding_dim})
    return C.parse_config(raw)


def test_without_its_entry_the_kind_is_unknown():
    assert set(REGISTRY) == set(FeatureKind)
    with pytest.raises(ValueError, match=r"features.user.4: Input tag 'hour_of_day'"):
        hour_config()


def test_the_only_change_is_one_registry_entry(hour_kind):
    assert set(REGISTRY) - set(FeatureKind) == {ToyKind.HOUR_OF_DAY}  # one entry added
    assert len(REGISTRY) == len(FeatureKind) + 1
    assert ToyKind.HOUR_OF_DAY.value not in {k.value for k in FeatureKind}  # enum unchanged
    assert set(FORM_MODULES) == set(InputForm)  # towers unchanged: the kind reuses ID
    assert hour_kind.form is InputForm.ID


def test_toy_kind_validates_in_a_config(hour_kind):
    cfg = hour_config()
    hour = cfg.features.user[-1]
    assert isinstance(hour, HourOfDayFeature) and hour.embedding_dim == 3
    assert C.parse_config(cfg.to_dict()) == cfg  # dumped with its own fields
    with pytest.raises(ValueError, match=r"features.user.4.hour_of_day.embedding_dim"):
        hour_config(embedding_dim=0)


def test_toy_kind_fits_and_encodes(hour_kind, tmp_path):
    st = F.fit_feature(hour_config().features.user[-1], pa.array([7, 23]))
    assert st.type is ToyKind.HOUR_OF_DAY and st.num_embeddings == 26
    # hour h -> h + 2; null -> pad 0; 24 and -1 are not hours -> OOV 1
    out = F.encode_feature(pa.array([0, 23, None, 24, -1, 7]), st, "hour")["hour"]
    np.testing.assert_array_equal(out, [2, 25, 0, 1, 1, 9])
    tower = TowerState({"hour": st})
    np.testing.assert_array_equal(F.transform_tower({"hour": [5]}, tower)["hour"], [7])
    # serving: a request's raw value and a missing one
    np.testing.assert_array_equal(F.encode_feature(raw_array(13, st), st, "h")["h"], [15])
    np.testing.assert_array_equal(F.encode_feature(raw_array(None, st), st, "h")["h"], [0])
    with pytest.raises(ValueError, match="a hour_of_day feature takes a single value"):
        raw_array([1, 2], st)
    # the JSON state names the kind and loads it back as the toy enum
    fitted = FeatureStateSet(tower, TowerState({}), "user_id", "item_id")
    fitted.save(tmp_path / "s.json")
    assert FeatureStateSet.load(tmp_path / "s.json").user.features["hour"].type \
        is ToyKind.HOUR_OF_DAY


def test_toy_kind_column_is_type_checked(hour_kind, tmp_path):
    columns = tables.required_columns(hour_config())["users"]
    assert columns["hour"] == "hour_of_day"
    pq.write_table(pa.table({"hour": pa.array([3, 4], pa.int32())}), tmp_path / "ok.parquet")
    tables.validate_table(tables.resolve_files("users", str(tmp_path / "ok.parquet")),
                      {"hour": columns["hour"]})
    pq.write_table(pa.table({"hour": ["3am"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"column 'hour' has type string, expected integer "
                                         r"hour 0-23 for a hour_of_day column"):
        tables.validate_table(tables.resolve_files("users", str(tmp_path / "bad.parquet")),
                          {"hour": columns["hour"]})


def test_toy_kind_builds_a_tower_module(hour_kind):
    st = F.fit_feature(HourOfDayFeature(name="hour", embedding_dim=3), None)
    module = build_feature("hour", st, TowerConfig(), {}, {})
    assert isinstance(module, CategoricalEmbedding)  # the ID form's module
    ids = F.encode_feature(pa.array([0, None, 23]), st, "hour")
    x = module({k: torch.from_numpy(v) for k, v in ids.items()})
    assert x.shape == (3, 3)
    assert torch.equal(x[1], torch.zeros(3))  # null -> padding row 0, kept at zero
