"""Training: the plain loop, Ray Train with 2 workers, resume, and a worker crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.run_dir import RunDir
from tests.conftest import demo_config
from towers.model import load_trained
from training.loop import run_plain


def fresh_run(demo_prepared, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_prepared / "prepared", run_dir / "prepared")
    return run_dir


def test_plain_training_learns_and_publishes_a_loadable_model(demo_prepared, demo_data,
                                                               tmp_path):
    run_dir = fresh_run(demo_prepared, tmp_path)
    cfg = demo_config(demo_data, "train.epochs=4", "train.patience=4",
                      "train.mlflow.enabled=true")
    out = run_plain(cfg, run_dir, log=lambda m: None)
    losses = [h["train/loss"] for h in out["history"]]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1
    # the published model is the best epoch, and reloads to the same embeddings
    model, meta, fitted = load_trained(RunDir(run_dir))
    assert meta.train_state["best_epoch"] == out["best_epoch"]
    best = out["history"][out["best_epoch"] - 1]["val/HR@50"]
    assert best == max(h["val/HR@50"] for h in out["history"])
    assert 0.0 <= best <= 1.0
    assert meta.feature_state_hash == fitted.content_hash()
    assert len(meta.model_version) >= 8
    # the same per-epoch metrics went to MLflow (file store under RUN_DIR/mlruns)
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").as_uri())
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    logged = client.get_metric_history(run_id, "val/HR_at_50")
    assert [m.value for m in logged] == pytest.approx([h["val/HR@50"] for h in out["history"]])
    assert client.get_run(run_id).data.params["train.epochs"] == "4"


def test_ray_train_two_workers_resumes_at_the_next_epoch(ray_session, demo_prepared, demo_data,
                                                         tmp_path):
    from training.ray_train import fit

    run_dir = fresh_run(demo_prepared, tmp_path)
    first = fit(demo_config(demo_data, "train.epochs=1", "train.num_workers=2"), run_dir,
                log=lambda m: None)
    assert [h["epoch"] for h in first["history"]] == [1]
    second = fit(demo_config(demo_data, "train.epochs=2", "train.num_workers=2",
                             "train.patience=5"), run_dir, log=lambda m: None)
    # epoch 1 was not trained again: its record is carried over unchanged from the checkpoint
    assert [h["epoch"] for h in second["history"]] == [1, 2]
    assert second["history"][0] == first["history"][0]
    assert (run_dir / "model" / "model.pt").exists()
    state = json.loads((run_dir / "model" / "meta.json").read_text())["train_state"]
    assert state["epoch"] == state["best_epoch"] == second["best_epoch"]
    assert second["best_epoch"] in (1, 2)


def test_worker_crash_restarts_from_the_checkpoint(ray_session, demo_prepared, demo_data,
                                                   tmp_path):
    from training.ray_train import fit

    run_dir = fresh_run(demo_prepared, tmp_path)
    marker = tmp_path / "crashed"
    cfg = demo_config(demo_data, "train.epochs=3", "train.num_workers=2", "train.patience=5",
                      "train.max_failures=1")
    out = fit(cfg, run_dir, log=lambda m: None,
              fail_once={"epoch": 2, "rank": 1, "marker": str(marker)})
    assert marker.read_text().startswith("crashed at epoch 2 rank 1")
    # each epoch appears once: epoch 1 came back from its checkpoint, 2 and 3 ran after it
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    assert len(list((run_dir / "train" / "train").glob("checkpoint_*"))) >= 1


def test_loss_matches_single_process_on_the_same_batch(demo_prepared, demo_data):
    """The step is plain PyTorch: one batch gives a finite loss with gradients everywhere."""
    from training.loop import setup

    cfg = demo_config(demo_data)
    s = setup(cfg, demo_prepared, torch.device("cpu"), world_size=1, rank=0)
    from indexing.batches import iterate_batches, to_tensors
    from training.data import train_columns

    batch = next(iterate_batches(train_columns(RunDir(demo_prepared), cfg), 64))
    loss, parts = s.task.loss(s.module, to_tensors(batch))
    loss.backward()
    assert torch.isfinite(loss) and parts["loss"] > 0
    missing = [n for n, p in s.module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] or all("temperature" in n for n in missing)


@pytest.mark.parametrize("step,total,factor", [(0, 100, 0.2), (4, 100, 1.0), (100, 100, 0.05)])
def test_lr_schedule_warmup_then_cosine(step, total, factor):
    from pipeline.config.train import TrainConfig
    from training.step import lr_factor

    cfg = TrainConfig(warmup_steps=5, schedule="cosine")
    # warm-up: (0 + 1) / 5 = 0.2, (4 + 1) / 5 = 1.0; end of cosine: floor 0.05
    assert lr_factor(step, total, cfg) == pytest.approx(factor)
