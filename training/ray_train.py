"""Ray Train: DDP workers over shards of the training table, checkpoints, resume and restarts.

The driver (:func:`fit`) starts a ``TorchTrainer``; each worker
(:func:`train_loop_per_worker`) re-validates the config, sets its torch threads (the
node's CPUs shared among its workers), reads its shard of the training table once as
tensors (:func:`training.loop.setup`), resumes from ``ray.train.get_checkpoint()`` when
there is one, and per epoch walks its shard in that epoch's order, trains, and reports.
The epoch's figures are combined over workers; rank 0 evaluates, decides early stopping
for everyone, logs to MLflow and one line per epoch, and attaches the checkpoint.

Running again with the same ``RUN_DIR`` resumes: the run name and storage path are
fixed, so Ray Train restores its checkpoint history and the workers continue from the
latest checkpoint. A worker crash restarts the group (``FailureConfig``) the same way.
Ray Train's own INFO lines (worker-group start, every report reprinted as a
``TrainingReport(...)``, checkpoint paths) stay in its log files under the Ray session
(``RunConfig.logging_config``); its warnings still reach the console.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, parse_config
from pipeline.config.train import TrainConfig
from pipeline.run_dir import RunDir, require_prepared_as
from training import checkpoint as ckpt
from training.loop import (
    Log,
    checkpoint_meta,
    describe,
    finish_epoch,
    finished,
    selection_metric,
    setup,
    train_one_epoch,
)
from training.tracking import Tracker

RUN_NAME = "train"
# Gradients are all-reduced straight from DDP's buckets (no copy into and out of them);
# DDP overlaps each bucket's all-reduce with the rest of the backward pass.
DDP_KWARGS = {"gradient_as_bucket_view": True}
# Ray Train routes worker logging to the driver and the dashboard (a print can appear twice).
logger = logging.getLogger(__name__)


def storage_path(cfg: Config, run_dir: Path) -> str:
    """Ray Train storage: the config's path or URI, else ``RUN_DIR/train`` (absolute)."""
    return cfg.train.storage_path or str(RunDir(run_dir).train_storage)


def _maybe_fail(fault: dict | None, epoch: int, rank: int) -> None:
    """Test hook: crash this worker process once at the given epoch and rank."""
    if not fault or fault["epoch"] != epoch or fault["rank"] != rank:
        return
    marker = Path(fault["marker"])
    if not marker.exists():
        marker.write_text(f"crashed at epoch {epoch} rank {rank}\n")
        os._exit(1)


def worker_threads(cfg: TrainConfig, local_world_size: int) -> int:
    """Torch threads of one worker.

    ``train.threads_per_worker``, else the node's CPUs (as Ray counts them) shared evenly
    among the workers on that node, so that the workers' threads add up to the node.
    """
    if cfg.threads_per_worker:
        return cfg.threads_per_worker
    import ray

    node = ray.get_runtime_context().get_node_id()
    cpus = next((n["Resources"].get("CPU", 1.0) for n in ray.nodes() if n["NodeID"] == node),
                1.0)
    return max(1, int(cpus // max(1, local_world_size)))


def _agree(obj: Any, world: int) -> Any:
    """Rank 0's value on every rank (the stop decision and the metrics)."""
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _quiet_report_log() -> None:
    """Keep Ray Train's per-report INFO line (a whole ``TrainingReport(...)``) off the console.

    Ray Train 2.60 names that logger after its file, outside ``ray.train``, so
    ``RunConfig.logging_config`` misses it; this sets the level that setting meant to.
    """
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    """One Ray Train worker."""
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    cfg = parse_config(loop_config["config"], source="train_loop_config")
    run_dir = Path(loop_config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(cfg.train, ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    s = setup(cfg, run_dir, device, world, rank, wrap=lambda m: ray.train.torch.prepare_model(
        m, move_to_device=True, parallel_strategy_kwargs=DDP_KWARGS))
    if rank == 0:
        for line in s.resolved:
            logger.info(f"[train] {line}")
    state = ckpt.TrainState()
    restored = ray.train.get_checkpoint()
    if restored:
        with restored.as_directory() as d:
            state = s.restore(Path(d))
    tracker = Tracker(cfg, run_dir, enabled=rank == 0)
    stop = finished(cfg, state)
    while not stop:
        _maybe_fail(loop_config.get("fail_once"), state.epoch + 1, rank)
        stats = train_one_epoch(s, state)
        metrics, is_best, stop = finish_epoch(s, state, stats) if rank == 0 else ({}, 0, 0)
        metrics, stop = _agree((metrics, stop), world)
        if rank != 0:
            state.epoch, state.step = int(metrics["epoch"]), state.step + int(stats["steps"])
            ray.train.report(metrics)
            continue
        tracker.log(metrics, step=state.epoch)
        logger.info(describe(metrics, cfg, state))
        with tempfile.TemporaryDirectory() as tmp:
            meta = checkpoint_meta(s, metrics, is_best=bool(is_best))
            s.save(Path(tmp), state, meta)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    tracker.close()


def fit(cfg: Config, run_dir: Path, log: Log = print, fail_once: dict | None = None,
        callbacks: list | None = None) -> dict[str, Any]:
    """Train with Ray Train and publish the best checkpoint to ``RUN_DIR/model/``.

    ``callbacks``: extra Ray Train callbacks (a Tune trial passes its report callback).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    run = RunDir(run_dir)
    require_prepared_as(run, cfg)
    metric = selection_metric(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(Path(run_dir).resolve()),
                           "fail_once": fail_once},
        scaling_config=ray.train.ScalingConfig(
            num_workers=max(1, cfg.train.num_workers), use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                  **cfg.train.resources_per_worker},
            placement_strategy=cfg.train.placement.value),
        run_config=ray.train.RunConfig(
            name=RUN_NAME, storage_path=storage_path(cfg, run_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.train.num_to_keep, checkpoint_score_attribute=metric,
                checkpoint_score_order="max"),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=callbacks))
    log(f"[train] Ray Train: {cfg.train.num_workers} worker(s), storage "
        f"{storage_path(cfg, run_dir)}/{RUN_NAME}")
    result = trainer.fit()
    best = _best_checkpoint(result, metric)
    with best.as_directory() as d:
        best_state = ckpt.train_state(Path(d))
        ckpt.publish_model(Path(d), run)
    chosen = ("(train.refit: the last)" if cfg.train.refit else
              f"{metric}={best_state.best_metric:.4f}")
    log(f"[train] best epoch {best_state.best_epoch} {chosen}; model in {run.model}")
    with result.checkpoint.as_directory() as d:
        latest = ckpt.train_state(Path(d))
    return {"best_epoch": best_state.best_epoch, "best_metric": best_state.best_metric,
            "history": latest.history, "path": result.path}


def _best_checkpoint(result, metric: str):
    """The kept checkpoint with the highest ``metric`` (:func:`selection_metric`)."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if metric in m]
    if not scored:
        if result.checkpoint is None:
            raise RuntimeError("training reported no checkpoint")
        return result.checkpoint
    return max(scored, key=lambda cm: cm[1][metric])[0]
