"""Training: the plain loop, Ray Train with 2 workers against one process, resume, a worker
crash, early stopping, and the per-worker shards."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from indexing.eval_set import load_eval_set
from indexing.evaluate import evaluate
from pipeline.run_dir import RunDir, read_catalogue, read_model_meta
from tests.conftest import demo_config
from towers.model import load_trained, model_version
from training.checkpoint import TrainState
from training.data import epoch_batches, load_shard, train_table
from training.loop import run_plain, setup, track_progress


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
    # the published model is the best epoch: evaluated again, it scores that epoch's figure
    model, meta, fitted = load_trained(RunDir(run_dir))
    assert meta.train_state["best_epoch"] == out["best_epoch"]
    # (the best epoch by the configured selection metric, not by any other figure)
    chosen = cfg.train.early_stopping_metric
    best = out["history"][out["best_epoch"] - 1][f"val/{chosen}"]
    assert best == max(h[f"val/{chosen}"] for h in out["history"])
    again = evaluate(model, load_eval_set(RunDir(run_dir), "validation"),
                     read_catalogue(RunDir(run_dir)))
    assert again["masked"][chosen] == pytest.approx(best, abs=1e-9)
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


def test_ddp_two_workers_step_as_one_process_on_the_global_batches(ray_session, demo_prepared,
                                                                 demo_data, tmp_path):
    """Ray Train, 2 gloo workers of batch B: the same weights and loss as one process stepping
    each global batch (rank 0's B rows, then rank 1's) with batch 2B."""
    from training.ray_train import fit
    from training.step import train_epoch

    run_dir = fresh_run(demo_prepared, tmp_path)
    ddp = fit(demo_config(demo_data, "train.epochs=1", "train.num_workers=2",
                          "train.batch_size=128"), run_dir, log=lambda m: None)

    cfg = demo_config(demo_data, "train.epochs=1", "train.batch_size=256")
    s = setup(cfg, run_dir, torch.device("cpu"), world_size=1, rank=0)
    shards = [load_shard(train_table(RunDir(run_dir), cfg), rank, 2) for rank in (0, 1)]
    halves = [epoch_batches(shard, 128, cfg.train.seed, epoch=0) for shard in shards]
    global_batches = ({k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(*halves, strict=True))
    one = train_epoch(s.module, s.task, global_batches, s.opt, s.scheduler, cfg.train, s.device)

    epoch = ddp["history"][0]
    assert epoch["train/rows"] == one["rows"] == one["steps"] * 256  # all workers' rows
    assert epoch["train/loss"] == pytest.approx(one["loss"], rel=1e-5)  # mean over workers
    trained = torch.load(run_dir / "model" / "model.pt", weights_only=True)
    for name, value in s.model.state_dict().items():
        torch.testing.assert_close(trained[name], value, atol=2e-5, rtol=1e-4, msg=name)


def test_the_step_reaches_every_parameter(demo_prepared, demo_data):
    """One batch: a finite loss and a gradient on every trainable parameter."""
    cfg = demo_config(demo_data)
    s = setup(cfg, demo_prepared, torch.device("cpu"), world_size=1, rank=0)
    batch = next(epoch_batches(s.shard, 64, seed=0, epoch=0))
    loss, parts = s.task.loss(s.module, batch)
    loss.backward()
    assert torch.isfinite(loss) and parts["loss"] > 0
    assert s.task.samples(batch) == 64
    missing = [n for n, p in s.module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] or all("temperature" in n for n in missing)


@pytest.mark.parametrize("scores,min_improvement,patience,stop_at,best_epoch", [
    # progress needs +0.01 over the last progress (0.10): 0.105 and 0.1055 are not, so
    # patience 2 stops at epoch 3; the best epoch is still the highest score, epoch 3
    ([0.10, 0.105, 0.1055, 0.2], 0.01, 2, 3, 3),
    # with no threshold every rise is progress: no stop, best is the last
    ([0.10, 0.105, 0.1055, 0.2], 0.0, 2, None, 4),
    # a fall then a small rise: 0.30 (progress), 0.25, 0.305 (< 0.30 + 0.01) -> stop at 3
    ([0.30, 0.25, 0.305, 0.5], 0.01, 2, 3, 3),
    # a rise equal to the threshold counts as progress (exact in binary), never stops
    ([0.25, 0.5, 0.75], 0.25, 1, None, 3),
])
def test_early_stopping_needs_min_improvement(scores, min_improvement, patience, stop_at,
                                              best_epoch):
    state, stopped = TrainState(), None
    for score in scores:
        state.epoch += 1
        track_progress(state, score, min_improvement)
        if stopped is None and state.bad_epochs >= patience:
            stopped = state.epoch
            break
    assert stopped == stop_at
    assert state.best_epoch == best_epoch


def test_a_plateaued_run_stops(demo_prepared, demo_data, tmp_path):
    """No epoch can rise by 1.0 over the first: patience 2 ends a 10-epoch run at epoch 3."""
    run_dir = fresh_run(demo_prepared, tmp_path)
    cfg = demo_config(demo_data, "train.epochs=10", "train.patience=2",
                      "train.min_improvement=1.0")
    lines = []
    out = run_plain(cfg, run_dir, log=lines.append)
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]
    assert len(lines) == 3 and "early stop" in lines[-1] and "early stop" not in lines[1]
    best = max(range(3), key=lambda i: out["history"][i]["val/HR@50"])
    assert out["best_epoch"] == best + 1


def test_shards_split_the_rows_evenly_and_epochs_reorder_them(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "train"
    folder.mkdir()
    pairs = pa.array([[i, -i] for i in range(11)], pa.list_(pa.int64(), 2))  # as prepare writes
    rows = pa.table({"item_index": list(range(11)), "user__x": pairs,
                     "timestamp": list(range(11))})  # timestamp is not a model column
    pq.write_table(rows.slice(0, 4), folder / "part-0.parquet", row_group_size=3)
    pq.write_table(rows.slice(4), folder / "part-1.parquet", row_group_size=3)
    # 11 rows over 3 workers: 3 each, rank r gets rows r, r + 3, r + 6; row 9 and 10 unused
    shards = [load_shard([folder], rank, 3) for rank in range(3)]
    assert [s["item_index"].tolist() for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert set(shards[0]) == {"item_index", "user__x"}
    assert shards[1]["user__x"].tolist() == [[1, -1], [4, -4], [7, -7]]
    one = load_shard([folder])
    assert one["item_index"].tolist() == list(range(11))

    def order(epoch):
        return [b["item_index"].tolist() for b in epoch_batches(one, 4, seed=5, epoch=epoch)]

    assert order(0) == order(0) and order(0) != order(1)  # replayable, new each epoch
    assert [len(b) for b in order(0)] == [4, 4]  # the partial batch of 3 is dropped
    assert len(set(sum(order(0), []))) == 8  # no row twice
    with pytest.raises(ValueError, match="fewer than the 12 workers"):
        load_shard([folder], 0, 12)


@pytest.mark.parametrize("step,total,factor", [(0, 100, 0.2), (4, 100, 1.0), (100, 100, 0.05)])
def test_lr_schedule_warmup_then_cosine(step, total, factor):
    from pipeline.config.train import TrainConfig
    from training.step import lr_factor

    cfg = TrainConfig(warmup_steps=5, schedule="cosine")
    # warm-up: (0 + 1) / 5 = 0.2, (4 + 1) / 5 = 1.0; end of cosine: floor 0.05
    assert lr_factor(step, total, cfg) == pytest.approx(factor)


def test_weight_average_is_an_ema_with_warm_up_whose_span_is_in_epochs():
    from pipeline.config.train import TrainConfig
    from training.step import weight_average

    assert weight_average(torch.nn.Linear(1, 1), TrainConfig(), 10) is None
    model = torch.nn.Linear(1, 1, bias=False)
    avg = weight_average(model, TrainConfig(average_epochs=2.5), steps_per_epoch=4)
    decay = 1 - 1 / 10  # 2.5 epochs x 4 steps
    expected = None
    for n, w in enumerate([3.0, -1.0, 5.0, 2.0, 7.0, 0.5] + [4.0] * 30):
        with torch.no_grad():
            model.weight.fill_(w)
        avg.update_parameters(model)
        d = min(decay, (1 + n) / (10 + n))
        expected = w if n == 0 else d * expected + (1 - d) * w
        assert avg.module.weight.item() == pytest.approx(expected, abs=1e-6)
    assert 3.9 < expected < 4.0 and model.weight.item() == 4.0  # it lags the raw weights


def test_averaged_training_validates_saves_and_resumes_the_average(demo_prepared, demo_data,
                                                                   tmp_path):
    from training.loop import checkpoint_meta, finish_epoch, train_one_epoch

    run_dir = fresh_run(demo_prepared, tmp_path)
    cfg = demo_config(demo_data, "train.epochs=2", "train.patience=2", "train.average_epochs=1")
    s = setup(cfg, run_dir, torch.device("cpu"), world_size=1, rank=0)
    state = TrainState()
    metrics, _, _ = finish_epoch(s, state, train_one_epoch(s, state))
    raw = {k: v.clone() for k, v in s.model.state_dict().items()}
    avg = {k: v.clone() for k, v in s.eval_model.state_dict().items()}
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)  # two different sets of weights
    # validation scored the average
    again = evaluate(s.eval_model, s.eval_set, s.catalogue)
    assert again["masked"]["HR@50"] == pytest.approx(metrics["val/HR@50"], abs=1e-9)
    s.save(tmp_path / "ck", state, checkpoint_meta(s, metrics))
    # model.pt is the average (what is published and served); resuming restores both
    saved = torch.load(tmp_path / "ck" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], avg[k]) for k in avg)
    assert read_model_meta(tmp_path / "ck").model_version == model_version(s.eval_model)
    assert model_version(s.eval_model) != model_version(s.model)
    t = setup(cfg, run_dir, torch.device("cpu"), world_size=1, rank=0)
    t.restore(tmp_path / "ck")
    assert all(torch.equal(t.model.state_dict()[k], raw[k]) for k in raw)
    assert all(torch.equal(t.eval_model.state_dict()[k], avg[k]) for k in avg)
