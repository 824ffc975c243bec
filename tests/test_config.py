"""Config validation: unknown keys, wrong types and bad combinations name the key."""

from __future__ import annotations

import copy

import pytest
import yaml

from pipeline.config import apply_overrides, load_config, parse_config
from tests.conftest import TINY_CONFIG


def cfg_with(**changes):
    raw = copy.deepcopy(TINY_CONFIG)
    for path, value in changes.items():
        apply_overrides(raw, [f"{path.replace('__', '.')}={yaml.safe_dump(value).strip()}"])
    return raw


def test_shipped_configs_validate(tmp_path):
    for name in ("demo", "demo_sparse", "ml100k", "ml100k_rows", "amazon_sports", "large",
                 "tiny"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.features.user and cfg.features.item


def test_the_real_data_configs_ship_one_model_sequence_and_loss_section():
    """ML-100K and Amazon Sports: one family (docs/training.md); data statistics resolve
    the rest (sequence.candidates, sequence.length_pools)."""
    ml, amazon = (load_config(f"configs/{n}.yaml") for n in ("ml100k", "amazon_sports"))
    for section in ("model", "sequence", "loss"):
        assert getattr(ml, section) == getattr(amazon, section), section
    assert ml.train.lr == amazon.train.lr and ml.train.schedule == amazon.train.schedule


def test_unknown_key_is_named():
    raw = cfg_with(prepare__min_user_interaction=3)  # typo: missing "s"
    with pytest.raises(ValueError, match=r"prepare.min_user_interaction: Extra inputs"):
        parse_config(raw)


def test_wrong_type_is_named():
    raw = cfg_with(features__user__1__boundaries="thirty")
    with pytest.raises(ValueError, match=r"features.user.1.numeric.boundaries"):
        parse_config(raw)


def test_unknown_feature_type_lists_accepted():
    raw = cfg_with(features__item__1__type="colour")
    with pytest.raises(ValueError, match=r"features.item.1.*'categorical'.*'sequence'"):
        parse_config(raw)


@pytest.mark.parametrize("change, message", [
    ({"features__item__1__hash_buckets": 100, "features__item__1__min_count": 3},
     "hash_buckets=100 cannot be combined with min_count=3"),
    ({"features__user__1__transform": "standardize"},
     "boundaries are only used with transform=bucketize, not transform=standardize"),
    ({"features__user__1__boundaries": [30, 20]}, "boundaries must be strictly increasing"),
    ({"features__user__3__item_features": ["tags"]},
     r"item_features \['tags'\] are not categorical item features; accepted: "
     r"\['category', 'item_id'\]"),
    ({"features__item__0__name": "category"}, r"duplicate feature names \['category'\]"),
])
def test_bad_combinations(change, message):
    with pytest.raises(ValueError, match=message):
        parse_config(cfg_with(**change))


def test_sequence_in_item_tower_is_rejected():
    raw = copy.deepcopy(TINY_CONFIG)
    raw["features"]["item"].append({"name": "s", "type": "sequence"})
    with pytest.raises(ValueError, match="'s' is a sequence feature"):
        parse_config(raw)


def test_overrides_parse_yaml_values_and_index_lists(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY_CONFIG))
    cfg = load_config(path, ["data.root=/data/x", "features.user.0.min_count=4",
                             "prepare.num_cpus=0.5"])
    assert cfg.data.root == "/data/x"
    assert cfg.features.user[0].min_count == 4
    assert cfg.prepare.num_cpus == 0.5
    assert cfg.data.resolve("items.parquet") == "/data/x/items.parquet"
    assert cfg.data.resolve("s3://b/items") == "s3://b/items"
    with pytest.raises(ValueError, match="not an index below 4"):
        load_config(path, ["features.user.9.min_count=4"])
    with pytest.raises(ValueError, match="must look like section.field=value"):
        load_config(path, ["data.root"])
