"""Towers: generated configs (shape, norm, gradients), hand-worked embeddings, tying, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tower_cases import (
    ITEM_ROWS,
    bag,
    batch_for,
    build,
    categorical,
    demo_state,
    dense,
    model_config,
    numeric,
    sequence,
    state_set,
)

from pipeline.config.model import Aggregation, TowerType
from towers import bodies
from towers.bodies import TowerBody
from towers.features import Aggregator
from towers.layers import MLP
from towers.model import TEMPERATURE_RANGE, model_version

ALL = list(Aggregation)
ITEM_DIM = 4


def _mlp(draw) -> dict:
    return {"hidden": draw(st.sampled_from([[], [8], [8, 8]])),
            "activation": draw(st.sampled_from(["relu", "gelu", "tanh", "leaky_relu"])),
            "norm": draw(st.sampled_from(["batch", "layer", "none"])),
            "dropout": draw(st.sampled_from([0.0, 0.3])), "residual": draw(st.booleans()),
            "gradient_checkpointing": draw(st.booleans())}


def _tower(draw, kind: TowerType, names: list[str]) -> dict:
    cfg = {"type": kind, "aggregation": draw(st.sampled_from(ALL)),
           "aggregation_dim": draw(st.sampled_from([None, 5])),
           "numeric_projection_dim": draw(st.sampled_from([None, 3])),
           "variational_dropout": draw(st.booleans()), "mlp": _mlp(draw),
           "transformer": {"dim": 8, "num_heads": 2, "num_layers": 1,
                           "causal": draw(st.booleans()),
                           "pooling": draw(st.sampled_from(["last", "mean", "attention", "max"]))},
           "cnn": {"channels": draw(st.sampled_from([[], [6]])),
                   "kernel_size": draw(st.sampled_from([2, 3])),
                   "pooling": draw(st.sampled_from(["last", "mean", "attention", "max"]))}}
    if kind is TowerType.FUSION:
        group = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        cfg["fusion"] = {"groups": {"a": group}, "dim": 6,
                         "mode": draw(st.sampled_from(["concat", "attention", "gating"]))}
    return cfg


@st.composite
def cases(draw):
    """(ModelConfig, FeatureStateSet) over every feature, body and aggregation."""
    tie = draw(st.sampled_from([None, True, False]))
    seq_dim = ITEM_DIM if tie else draw(st.sampled_from([ITEM_DIM, 6]))
    item = {"item_id": categorical(ITEM_ROWS, ITEM_DIM), "category": categorical(5, 3)}
    optional_item = {"tags": bag("multi_hot", pooling=draw(st.sampled_from(["mean", "sum"]))),
                     "title": bag("text", rows=9, dim=5, length=4),
                     "price": numeric(draw(st.sampled_from(["standardize", "bucketize"])),
                                      missing=draw(st.booleans())),
                     "embedding": dense(5)}
    item.update({n: s for n, s in optional_item.items() if draw(st.booleans())})
    user_type = draw(st.sampled_from(list(TowerType)))
    user = {"user_id": categorical(9, 6), "age": numeric("bucketize", missing=False)}
    if user_type in (TowerType.TRANSFORMER, TowerType.CNN) or draw(st.booleans()):
        feats = tuple(draw(st.lists(st.sampled_from(["category"]), max_size=1)))
        user["history"] = sequence(seq_dim, 5, feats)
    if draw(st.booleans()):
        user["signup"] = numeric("log", missing=True)
    item_type = draw(st.sampled_from([TowerType.MLP, TowerType.FUSION]))
    cfg = model_config(
        output_dim=draw(st.sampled_from([3, 8])), similarity=draw(st.sampled_from(["dot",
                                                                                  "cosine"])),
        learnable_temperature=draw(st.booleans()), tie_sequence_embedding=tie,
        user=_tower(draw, user_type, list(user)), item=_tower(draw, item_type, list(item)))
    return cfg, state_set(user, item)


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), batch=st.integers(2, 5), seed=st.integers(0, 3))
def test_generated_models_shape_norm_and_gradients(case, batch, seed):
    cfg, fitted = case
    torch.manual_seed(seed)
    model = build(cfg, fitted).train()
    u = model.encode_user(batch_for("user", fitted, batch, seed))
    i = model.encode_item(batch_for("item", fitted, batch, seed + 1))
    assert u.shape == i.shape == (batch, cfg.output_dim)
    assert torch.isfinite(u).all() and torch.isfinite(i).all()
    if cfg.similarity.normalized:
        torch.testing.assert_close(u.norm(dim=1), torch.ones(batch))
        torch.testing.assert_close(i.norm(dim=1), torch.ones(batch))
    logits = (u @ i.T) / model.temperature()  # [B, B]
    loss = F.cross_entropy(logits, torch.arange(batch)) + model.regularization_loss()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    model.eval()
    f = batch_for("user", fitted, batch, seed)
    torch.testing.assert_close(model.encode_user(f), model.encode_user(f))  # eval: no noise


def _hand_item_tower(pooling: str, aggregation: str = "concat", similarity: str = "dot"):
    """Item tower over an id (rows [0, 0], [r, 2r]) and tags (rows [r, 10 r]), identity output."""
    fitted = state_set(user={"user_id": categorical(3, 2)},
                       item={"item_id": categorical(4, 2), "tags": bag(rows=5, dim=2,
                                                                       pooling=pooling)})
    width = 4 if aggregation == "concat" else 2
    cfg = model_config(output_dim=width, similarity=similarity,
                       item={"aggregation": aggregation, "mlp": {"hidden": []}})
    tower = build(cfg, fitted).item_tower.eval()
    enc = tower.encoder.inputs
    r = torch.arange(5.0)
    with torch.no_grad():
        enc["item_id"].table.weight.copy_(torch.stack([r[:4], 2 * r[:4]], 1))
        enc["tags"].table.weight.copy_(torch.stack([r, 10 * r], 1))
        tower.output.weight.copy_(torch.eye(width))
        tower.output.bias.zero_()
    batch = {"item_id": torch.tensor([2, 3, 1]), "tags": torch.tensor([[2, 3, 0], [4, 0, 0],
                                                                        [0, 0, 0]])}
    with torch.no_grad():
        return tower(batch)


def test_hand_worked_mean_bag_concat():
    # tags [2, 3, pad] -> mean([2, 20], [3, 30]) = [2.5, 25]; [4] -> [4, 40]; empty -> [0, 0]
    # id 2 -> [2, 4], id 3 -> [3, 6], id 1 -> [1, 2]; concat = [id, tags]
    expected = torch.tensor([[2, 4, 2.5, 25], [3, 6, 4, 40], [1, 2, 0, 0]])
    torch.testing.assert_close(_hand_item_tower("mean"), expected)


def test_hand_worked_sum_bag_sum_and_multiply():
    # sum pooling: [2, 3] -> [5, 50]; [4] -> [4, 40]; empty -> [0, 0]
    torch.testing.assert_close(_hand_item_tower("sum", "sum"), torch.tensor(
        [[2 + 5, 4 + 50], [3 + 4, 6 + 40], [1, 2]], dtype=torch.float))
    # sum_item_multiply: tags (the only other feature) * id embedding
    torch.testing.assert_close(_hand_item_tower("sum", "sum_item_multiply"), torch.tensor(
        [[2 * 5, 4 * 50], [3 * 4, 6 * 40], [0, 0]], dtype=torch.float))


def test_hand_worked_cosine_normalises():
    # [2, 4, 2.5, 25] / sqrt(4 + 16 + 6.25 + 625)
    out = _hand_item_tower("mean", similarity="cosine")
    torch.testing.assert_close(out[0], torch.tensor([2, 4, 2.5, 25]) / 651.25 ** 0.5)


def test_mlp_body_mean_pools_history_over_real_positions():
    fitted = state_set(user={"user_id": categorical(3, 2), "history": sequence(2, 3)},
                       item={"item_id": categorical(ITEM_ROWS, 2)})
    cfg = model_config(output_dim=2, tie_sequence_embedding=False, similarity="dot",
                       user={"features": ["history"], "mlp": {"hidden": []}})
    tower = build(cfg, fitted).user_tower.eval()
    with torch.no_grad():
        tower.encoder.inputs["history"].id_table.weight.copy_(
            torch.arange(ITEM_ROWS * 2.0).view(-1, 2))  # row r = [2r, 2r + 1]
        tower.output.weight.copy_(torch.eye(2))
        tower.output.bias.zero_()
        # [pad, 3, 5] -> mean([6, 7], [10, 11]) = [8, 9]; all pad -> [0, 0]
        out = tower({"history": torch.tensor([[0, 3, 5], [0, 0, 0]])})
    torch.testing.assert_close(out, torch.tensor([[8.0, 9.0], [0.0, 0.0]]))
    assert list(tower.input_spec()) == ["history"]


def test_tying_shares_the_item_tables():
    fitted = demo_state(seq_dim=8, item_dim=8)
    model = build(model_config(), fitted)
    seq, item = model.user_tower.encoder.inputs["history"], model.item_tower.encoder
    assert seq.id_table is item.table("item_id")
    assert seq.item_tables["category"] is item.table("category")
    with torch.no_grad():
        item.table("item_id").weight[5] += 1.0
    torch.testing.assert_close(seq.id_table.weight[5], item.table("item_id").weight[5])
    untied = build(model_config(tie_sequence_embedding=False), fitted)
    assert untied.user_tower.encoder.inputs["history"].id_table is not \
        untied.item_tower.encoder.table("item_id")
    n_tied = sum(p.numel() for p in model.parameters())
    n_untied = sum(p.numel() for p in untied.parameters())
    assert n_untied - n_tied == ITEM_ROWS * 8 + 5 * 3  # one id table, one category table


def test_tie_default_follows_widths_and_true_with_mismatch_errors():
    fitted = demo_state(seq_dim=6, item_dim=8)
    model = build(model_config(), fitted)  # null: widths differ -> own table
    assert model.user_tower.encoder.inputs["history"].id_table.embedding_dim == 6
    with pytest.raises(ValueError, match=r"history.*embedding_dim=6.*item_id.*embedding_dim=8"):
        build(model_config(tie_sequence_embedding=True), fitted)
    with pytest.raises(ValueError, match="no item-tower id embedding"):
        build(model_config(tie_sequence_embedding=True,
                                     item={"features": ["category", "tags"]}),
                        demo_state(seq_dim=8, item_dim=8))


def test_sum_aggregation_projects_mismatched_widths():
    agg = Aggregator(Aggregation.SUM, {"a": 3, "b": 5}, None, None, "model.item")
    assert agg.output_dim() == 5 and list(agg.project) == ["a"]
    out = agg({"a": torch.ones(2, 3), "b": torch.zeros(2, 5)})
    torch.testing.assert_close(out, agg.project["a"](torch.ones(2, 3)))
    agg4 = Aggregator(Aggregation.SUM, {"a": 3, "b": 5}, None, 4, "model.item")
    assert agg4.output_dim() == 4 and sorted(agg4.project) == ["a", "b"]
    model = build(model_config(item={"aggregation": "sum"}), demo_state())
    assert sorted(model.item_tower.body.aggregate.project) == [
        "category", "item_id", "price", "tags", "title"]  # all but the widest: embedding, 16


@pytest.mark.parametrize("kw, message", [
    ({"user": {"type": "transformer", "features": ["user_id", "age"]}},
     r"model.user.type=transformer needs one sequence feature .*sequences in this tower: \[\]"),
    ({"item": {"aggregation": "sum_item_multiply", "features": ["category", "tags"]}},
     r"model.item.aggregation=sum_item_multiply needs the tower's id feature"),
    ({"item": {"aggregation": "sum_item_multiply", "features": ["item_id"]}},
     r"needs a feature besides the id feature 'item_id'"),
    ({"item": {"features": ["item_id", "colour"]}},
     r"model.item.features \['colour'\] are not features of this tower; accepted: "
     r"\['item_id', 'category'"),
    ({"user": {"type": "fusion", "fusion": {"groups": {"a": ["price"]}}}},
     r"model.user.fusion.groups name \['price'\]"),
    ({"learnable_temperature": True, "temperature": 50.0},
     r"model.temperature=50.0 must lie in \[0.01, 10.0\]"),
])
def test_bad_combinations_name_the_fields(kw, message):
    with pytest.raises(ValueError, match=message):
        build(model_config(**kw), demo_state())


def test_custom_body_is_a_subclass_and_one_map_entry(monkeypatch):
    class MeanOfFeatures(TowerBody):
        """Mean of the projected features: a body written outside towers/."""

        def __init__(self, encoder, cfg):
            super().__init__(encoder, cfg)
            self.agg = Aggregator(Aggregation.SUM, encoder.widths, None, 7, self.where)

        def output_dim(self):
            return 7

        def forward(self, encoded):
            return self.agg(bodies.pooled_vectors(encoded)) / len(self.agg.names)

    monkeypatch.setitem(bodies.TOWER_BODIES, TowerType.CNN, MeanOfFeatures)
    fitted = demo_state()
    model = build(model_config(output_dim=5, user={"type": "cnn"}), fitted)
    assert isinstance(model.user_tower.body, MeanOfFeatures)
    assert model.encode_user(batch_for("user", fitted, 3)).shape == (3, 5)


def test_temperature_fixed_or_learned_and_clamped():
    fitted = demo_state()
    fixed = build(model_config(temperature=0.05), fitted)
    assert "log_temperature" in dict(fixed.named_buffers())
    torch.testing.assert_close(fixed.temperature(), torch.tensor(0.05))
    learned = build(model_config(temperature=0.05, learnable_temperature=True), fitted)
    assert isinstance(learned.log_temperature, torch.nn.Parameter)
    with torch.no_grad():
        learned.log_temperature.fill_(-20.0)
    assert learned.temperature().item() == pytest.approx(TEMPERATURE_RANGE[0])


def test_variational_dropout_penalty_and_eval_identity():
    fitted = demo_state()
    off = build(model_config(), fitted)
    assert off.regularization_loss().item() == 0.0
    torch.manual_seed(0)
    on = build(model_config(user={"variational_dropout": True},
                                      item={"variational_dropout": True}), fitted)
    # 4 user + 6 item features, each initial p = 0.1: sum(1 - p) = 10 * 0.9
    assert on.regularization_loss().item() == pytest.approx(9.0)
    torch.manual_seed(0)
    plain = build(model_config(), fitted)
    plain.load_state_dict({k: v for k, v in on.state_dict().items() if "dropout" not in k})
    f = batch_for("item", fitted, 4)
    on.eval(), plain.eval()
    torch.testing.assert_close(on.encode_item(f), plain.encode_item(f))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = model_config(item={"mlp": {"hidden": [8, 8], "gradient_checkpointing": True}}).item.mlp
    torch.manual_seed(0)
    ckpt = MLP(6, cfg)
    plain = MLP(6, cfg.model_copy(update={"gradient_checkpointing": False}))
    plain.load_state_dict(ckpt.state_dict())
    x = torch.randn(4, 6)
    for m in (ckpt, plain):
        m(x).pow(2).sum().backward()
    for a, b in zip(ckpt.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_input_spec_follows_the_contract():
    spec = build(model_config(), demo_state()).user_tower.input_spec()
    assert spec == {"user_id": ("int64", ()), "age": ("int64", ()),
                    "age__missing": ("float32", ()), "signup_days": ("float32", ()),
                    "signup_days__missing": ("float32", ()), "history": ("int64", (5,)),
                    "history__category": ("int64", (5,))}


def test_model_version_is_a_deterministic_content_hash():
    fitted = demo_state()
    torch.manual_seed(1)
    a = build(model_config(), fitted)
    torch.manual_seed(1)
    b = build(model_config(), fitted)
    assert model_version(a) == model_version(b) and len(model_version(a)) == 16
    with torch.no_grad():
        b.item_tower.output.bias[0] += 1e-3
    assert model_version(a) != model_version(b)


def test_gating_aggregation_hand_worked_and_per_position():
    # a = [1, 0], b = [0, 3] (width 2 each, no projection); gate logits = [sum(a,b), 0] = [4, 0]
    # weights = softmax([4, 0]) = [0.982014, 0.017986] -> 0.982014 a + 0.017986 b
    agg = Aggregator(Aggregation.GATING, {"a": 2, "b": 2}, None, None, "model.user")
    with torch.no_grad():
        agg.gate.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
        agg.gate.bias.zero_()
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    w = 1 / (1 + math.exp(-4))
    torch.testing.assert_close(agg({"a": a, "b": b}), torch.tensor([[w, 3 * (1 - w)]]))
    # [B, L, E] inputs: the same rule at every position
    seq = agg({"a": a[:, None].expand(1, 3, 2), "b": b[:, None].expand(1, 3, 2)})
    assert seq.shape == (1, 3, 2)
    torch.testing.assert_close(seq[:, 1], agg({"a": a, "b": b}))
