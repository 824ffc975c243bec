"""Tower export: torch.export round trip, fresh-process loading with torch only, sidecar,
parity with the eager model for every tower type, and the programs publish_model writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from tower_cases import batch_for, build, demo_state, model_config

from indexing.batches import to_tensors
from pipeline.arrow import table_to_numpy
from pipeline.columns import TOWERS, tower_columns, tower_inputs
from pipeline.config.model import TowerType
from pipeline.run_dir import META_FILE, MODEL_FILE, RunDir, read_model_meta, read_table
from towers.export import export_tower, load_exported, sidecar_path
from towers.exported import ExportedTower
from towers.model import load_trained, model_version
from training.checkpoint import publish_model

FRESH_PROCESS = """
import sys, torch
program = torch.export.load(sys.argv[1]).module()
inputs = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    out = program(inputs)
torch.save(out, sys.argv[3])
assert "towers" not in sys.modules and "pipeline" not in sys.modules
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A transformer user tower and an MLP item tower (dropout, batch norm, VD), exported."""
    torch.manual_seed(0)
    fitted = demo_state()
    cfg = model_config(
        output_dim=8,
        user={"type": "transformer", "variational_dropout": True,
              "transformer": {"dim": 16, "causal": True, "pooling": "attention"},
              "mlp": {"hidden": [16], "norm": "batch", "dropout": 0.3}},
        item={"aggregation": "sum", "numeric_projection_dim": 4,
              "mlp": {"hidden": [16, 16], "dropout": 0.3, "gradient_checkpointing": True}})
    model = build(cfg, fitted).train()
    for side in ("user", "item"):  # move the batch-norm statistics off their initial values
        getattr(model, f"encode_{side}")(batch_for(side, fitted, 16, seed=5))
    out = tmp_path_factory.mktemp("export")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for side in ("user", "item"):
            export_tower(getattr(model, f"{side}_tower"), side, batch_for(side, fitted, 4),
                         out / f"{side}_tower.pt2", metadata={"model_version":
                                                               model_version(model)})
    return model, fitted, out, caught


def test_export_keeps_train_mode_and_warns_no_deprecation(exported):
    model, _, _, caught = exported
    assert model.user_tower.training and model.item_tower.training
    assert not [w for w in caught if "deprecat" in str(w.message).lower()]


@pytest.mark.parametrize("side", ["user", "item"])
@pytest.mark.parametrize("batch", [1, 7])
def test_round_trip_matches_eager_tower_in_eval(exported, side, batch):
    model, fitted, out, _ = exported
    loaded = load_exported(out / f"{side}_tower.pt2")
    features = batch_for(side, fitted, batch, seed=11)
    tower = getattr(model, f"{side}_tower")
    tower.eval()
    try:
        with torch.no_grad():
            expected = tower(features)
    finally:
        tower.train()
    got = loaded({**features, "unused_key": torch.zeros(batch)})[f"{side}_emb"]
    assert got.shape == (batch, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sidecar_lists_inputs_output_and_metadata(exported):
    model, _, out, _ = exported
    side = json.loads(sidecar_path(out / "user_tower.pt2").read_text())
    spec = model.user_tower.input_spec()
    assert side["format"] == "torch.export" and side["output"] == "user_emb"
    assert side["output_dim"] == 8 and side["normalized"] is True
    assert list(side["inputs"]) == list(spec)
    assert side["inputs"]["history"] == {"dtype": "int64", "shape": ["B", 5]}
    assert side["metadata"]["model_version"] == model_version(model)


def test_fresh_process_loads_with_torch_only(exported, tmp_path):
    model, fitted, out, _ = exported
    features = batch_for("user", fitted, 5, seed=3)
    torch.save(features, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(out / "user_tower.pt2"),
                    str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   check=True, capture_output=True, timeout=120)
    got = torch.load(tmp_path / "out.pt", weights_only=True)["user_emb"]
    model.eval()
    try:
        with torch.no_grad():
            expected = model.encode_user(features)
    finally:
        model.train()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_exports_and_loads_say_what_is_wrong(exported, tmp_path):
    model, fitted, out, _ = exported
    example = batch_for("item", fitted, 4)
    with pytest.raises(ValueError, match=r"export name 'items' must be one of"):
        export_tower(model.item_tower, "items", example, tmp_path / "x.pt2")
    with pytest.raises(ValueError, match=r"missing inputs \['price'\]"):
        export_tower(model.item_tower, "item", {k: v for k, v in example.items()
                                                if k != "price"}, tmp_path / "x.pt2")
    with pytest.raises(ValueError, match="batch size >= 2"):
        export_tower(model.item_tower, "item", batch_for("item", fitted, 1), tmp_path / "x.pt2")
    with pytest.raises(ValueError, match=r"'tags': got torch.float32"):
        export_tower(model.item_tower, "item", {**example, "tags": example["tags"].float()},
                     tmp_path / "x.pt2")
    with pytest.raises(ValueError, match=r"inputs \['history'\] are missing"):
        load_exported(out / "user_tower.pt2")({"user_id": torch.zeros(2, dtype=torch.long)}
                                              | {k: v for k, v in batch_for(
                                                  "user", fitted, 2).items() if k != "history"})
    with pytest.raises(ValueError, match="needs both the program"):
        load_exported(tmp_path / "missing.pt2")


# -- parity per tower type: the exported program is the eager tower in eval mode ----------

ATOL = RTOL = 1e-5  # float32 eager vs the exported graph: the same ops, reassociation only
PARITY_BATCHES = (1, 3, 17)  # below, at and above the export example's batch of 4
# Transformer and CNN bodies run over a sequence, which only the user tower has (histories
# are built from interactions): their case pairs them with an MLP item tower.
TOWER_CASES = {
    TowerType.MLP: dict(
        user={"mlp": {"hidden": [16], "norm": "batch", "dropout": 0.3}},
        item={"aggregation": "sum", "mlp": {"hidden": [16, 16], "dropout": 0.2}}),
    TowerType.TRANSFORMER: dict(
        user={"type": "transformer", "transformer": {"dim": 16, "num_layers": 1,
                                                     "pooling": "mean", "dropout": 0.2}},
        item={"mlp": {"hidden": [16], "norm": "batch"}}),
    TowerType.CNN: dict(
        similarity="dot",
        user={"type": "cnn", "aggregation": "sum_item_multiply",
              "cnn": {"kernel_size": 2, "channels": [8]}},
        item={"mlp": {"hidden": [16]}}),
    TowerType.FUSION: dict(
        user={"type": "fusion", "fusion": {"groups": {"seq": ["history", "age"]},
                                           "mode": "gating", "dim": 8}},
        item={"type": "fusion", "fusion": {"groups": {"text": ["tags", "title"]},
                                           "mode": "attention", "dim": 8}}),
}


def test_every_tower_type_has_a_parity_case():
    assert set(TOWER_CASES) == set(TowerType)


@pytest.fixture(scope="module", params=list(TOWER_CASES), ids=lambda t: t.value)
def exported_case(request, tmp_path_factory):
    """(model in eval mode, fitted state, folder of both exported towers) per tower type."""
    torch.manual_seed(1)
    fitted = demo_state()
    model = build(model_config(output_dim=8, **TOWER_CASES[request.param]),
                            fitted).train()
    out = tmp_path_factory.mktemp(f"export-{request.param.value}")
    for side in ("user", "item"):
        getattr(model, f"encode_{side}")(batch_for(side, fitted, 16, seed=5))  # move BN stats
        export_tower(getattr(model, f"{side}_tower"), side, batch_for(side, fitted, 4),
                     out / f"{side}_tower.pt2")
    return model.eval(), fitted, out


@pytest.mark.parametrize("side", ["user", "item"])
def test_exported_tower_equals_the_eager_model_in_eval(exported_case, side):
    model, fitted, out = exported_case
    loaded = ExportedTower(out / f"{side}_tower.pt2")
    for batch in PARITY_BATCHES:
        features = batch_for(side, fitted, batch, seed=100 + batch)  # not the export example
        with torch.no_grad():
            expected = getattr(model, f"encode_{side}")(features)
        got = loaded(features)[f"{side}_emb"]
        assert got.shape == (batch, 8)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, b=batch: f"batch {b}: {m}")


# -- publish: RUN_DIR/model/ programs equal the published weights ---------------------------

@pytest.fixture(scope="module")
def published(demo_trained, tmp_path_factory):
    """A run directory whose model/ was written by publish_model from a checkpoint."""
    src = RunDir(demo_trained)
    run = RunDir(tmp_path_factory.mktemp("published") / "run")
    shutil.copytree(src.prepared, run.prepared)
    checkpoint = tmp_path_factory.mktemp("checkpoint")
    for name in (MODEL_FILE, META_FILE):  # a checkpoint: weights and meta, no programs
        shutil.copy2(src.model / name, checkpoint / name)
    assert publish_model(checkpoint, run) == run.model
    return run


@pytest.mark.parametrize("tower", TOWERS)
def test_published_program_equals_load_trained_on_prepared_rows(published, tower):
    model, meta, _ = load_trained(published)
    exported = ExportedTower(published.exported_tower(tower))
    assert exported.spec["metadata"]["model_version"] == meta.model_version
    table = read_table(published, tower)
    columns = table_to_numpy(table, tower_columns(table.column_names, tower))
    features = tower_inputs(to_tensors(columns), tower)  # every row of prepared/{tower}s
    with torch.no_grad():
        expected = getattr(model, f"encode_{tower}")(features)
    got = exported(features)[f"{tower}_emb"]
    assert got.shape == (table.num_rows, meta.config.model.output_dim)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)


def test_the_model_meta_keeps_the_plan_the_model_is_built_from(published, tmp_path):
    meta = read_model_meta(published.model)
    assert meta.plan == meta.config.plan  # written by training
    assert "history" in meta.plan.user.features and meta.plan.item.id_feature == "item_id"
    # load_trained builds from the kept plan, not from the config: a plan whose user tower
    # leaves the history out builds a tower the saved weights do not fit
    user = meta.plan.user.model_copy(
        update={"features": [n for n in meta.plan.user.features if n != "history"]})
    doctored = meta.model_copy(update={"plan": meta.plan.model_copy(update={"user": user})})
    model_dir = tmp_path / "model"
    shutil.copytree(published.model, model_dir)
    (model_dir / META_FILE).write_text(doctored.model_dump_json(), encoding="utf-8")
    model, _, _ = load_trained(published)
    assert "history" in model.user_tower.encoder.inputs
    with pytest.raises(RuntimeError, match="history"):
        load_trained(published, model_dir=model_dir)
