"""The tower cross-checks of pipeline.config.checks, called directly and through both callers."""

from __future__ import annotations

import copy

import pytest

from pipeline.config import parse_config
from pipeline.config.checks import (
    check_item_multiply,
    fusion_groups,
    id_feature,
    selected_features,
    sequence_to_model,
    tie_sequence,
)
from pipeline.config.model import Aggregation, TowerConfig
from pipeline.config.plan import plan_for_state
from tests.conftest import TINY_CONFIG
from tests.tower_cases import demo_state, model_config

NAMES = ["user_id", "age", "history", "clicks"]  # tower order


def test_id_feature_is_the_first_categorical_on_the_key_column():
    feats = [("age", "numeric", "user_id"), ("uid", "categorical", "user_id"),
             ("uid2", "categorical", "user_id")]
    assert id_feature(feats, "user_id") == "uid"
    assert id_feature(feats, "item_id") is None


def test_selected_features_keep_tower_order_and_name_unknowns():
    assert selected_features(TowerConfig(), NAMES, "model.user") == NAMES
    assert selected_features(TowerConfig(features=["history", "user_id"]), NAMES,
                             "model.user") == ["user_id", "history"]
    with pytest.raises(ValueError, match=r"model.user.features \['colour'\] are not features of "
                       r"this tower; accepted: \['user_id', 'age', 'history', 'clicks'\]"):
        selected_features(TowerConfig(features=["age", "colour"]), NAMES, "model.user")


def test_sequence_to_model_picks_the_only_or_the_named_sequence():
    assert sequence_to_model(TowerConfig(), ["history"], "model.user") is None  # mlp body
    assert sequence_to_model(TowerConfig(type="cnn"), ["history"], "model.user") == "history"
    named = TowerConfig(type="transformer", transformer={"sequence": "clicks"})
    assert sequence_to_model(named, ["history", "clicks"], "model.user") == "clicks"
    with pytest.raises(ValueError, match=r"model.user.type=transformer needs one sequence "
                       r"feature to run over \(set model.user.transformer.sequence, now None\); "
                       r"sequences in this tower: \['history', 'clicks'\]"):
        sequence_to_model(TowerConfig(type="transformer"), ["history", "clicks"], "model.user")
    with pytest.raises(ValueError, match=r"model.user.cnn.sequence, now 'views'"):
        sequence_to_model(TowerConfig(type="cnn", cnn={"sequence": "views"}), ["history"],
                          "model.user")


def fusion(groups):
    return TowerConfig(type="fusion", fusion={"groups": groups})


def test_fusion_groups_add_rest_and_name_strangers():
    assert fusion_groups(fusion({"seq": ["history", "clicks"]}), NAMES, "model.user") == {
        "seq": ["history", "clicks"], "rest": ["user_id", "age"]}
    with pytest.raises(ValueError, match=r"model.user.fusion.groups name \['price'\], which are "
                       r"not features of this tower; accepted: \['user_id', 'age'"):
        fusion_groups(fusion({"a": ["age", "price"]}), NAMES, "model.user")
    with pytest.raises(ValueError, match=r"group names \['a.b'\] must be non-empty"):
        fusion_groups(fusion({"a.b": ["age"]}), NAMES, "model.user")
    with pytest.raises(ValueError, match=r"'rest' is reserved .*\['user_id', 'history', 'clicks'"):
        fusion_groups(fusion({"rest": ["age"]}), NAMES, "model.user")


def test_item_multiply_needs_the_id_and_a_second_feature():
    check_item_multiply(Aggregation.SUM_ITEM_MULTIPLY, ["item_id", "tags"], "item_id", "m.item")
    check_item_multiply(Aggregation.SUM, ["tags"], None, "model.item")  # other modes pass
    with pytest.raises(ValueError, match=r"model.item.aggregation=sum_item_multiply needs the "
                       r"tower's id feature .* among \['tags'\]; accepted otherwise: "
                       r"aggregation concat or sum"):
        check_item_multiply(Aggregation.SUM_ITEM_MULTIPLY, ["tags"], "item_id", "model.item")
    with pytest.raises(ValueError, match=r"needs a feature besides the id feature 'item_id'"):
        check_item_multiply(Aggregation.SUM_ITEM_MULTIPLY, ["item_id"], "item_id", "model.item")


@pytest.mark.parametrize("flag, item_id, item_dim, tied", [
    (None, "item_id", 8, True), (None, "item_id", 6, False), (None, None, None, False),
    (True, "item_id", 8, True), (False, "item_id", 8, False),
])
def test_tie_sequence_follows_the_flag_and_widths(flag, item_id, item_dim, tied):
    assert tie_sequence(flag, "history", 8, item_id, item_dim) is tied


def test_tie_sequence_true_names_the_mismatch():
    with pytest.raises(ValueError, match=r"model.tie_sequence_embedding=true needs user sequence "
                       r"'history' embedding_dim=6 to equal item feature 'item_id' "
                       r"embedding_dim=8; accepted otherwise: null, false"):
        tie_sequence(True, "history", 6, "item_id", 8)
    with pytest.raises(ValueError, match=r"'history' has no item-tower id embedding to share"):
        tie_sequence(True, "history", 8, None, None)


@pytest.mark.parametrize("model", [
    {"item": {"aggregation": "sum_item_multiply", "features": ["category", "tags"]}},
    {"user": {"type": "transformer", "features": ["user_id", "age"]}},
])
def test_a_config_and_a_fitted_state_give_the_same_message(model):
    raw = copy.deepcopy(TINY_CONFIG)
    raw["model"] = copy.deepcopy(model)
    with pytest.raises(ValueError) as from_state:
        plan_for_state(model_config(**copy.deepcopy(model)), demo_state())
    with pytest.raises(ValueError) as from_config:
        parse_config(raw)
    assert str(from_state.value) in str(from_config.value)
