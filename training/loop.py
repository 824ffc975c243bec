"""The training loop shared by Ray Train workers and the plain process.

:func:`setup` builds everything one worker needs from ``RUN_DIR/prepared/``;
:func:`finish_epoch` evaluates on the validation targets, applies early stopping and
says whether this epoch is the new best; :func:`run_plain` trains in this process with no
Ray at all (``python -m jobs.train --no-ray``), over the same step and the same data.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from indexing.batches import iterate_batches, to_tensors
from indexing.eval_set import EvalSet, load_eval_set
from indexing.evaluate import evaluate
from pipeline.config import Config
from pipeline.run_dir import ModelMeta, RunDir, read_catalogue, read_prepare_manifest
from pipeline.state import FeatureStateSet
from towers.model import build_two_tower, model_version
from training import checkpoint as ckpt
from training.data import item_counts, train_columns, training_split
from training.sequence import SequenceTask, SequenceTrainModule, history_keys
from training.step import make_optimizer, make_scheduler, train_epoch
from training.task import RetrievalTask, TrainModule
from training.tracking import Tracker

Log = Callable[[str], None]


@dataclass
class Setup:
    """Everything one worker trains with."""

    cfg: Config
    run: RunDir
    fitted: FeatureStateSet
    model: nn.Module  # the bare TwoTowerModel (what is saved)
    module: nn.Module  # what is stepped: TrainModule, DDP-wrapped under Ray
    task: RetrievalTask  # or SequenceTask (the sequence mode)
    opt: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    catalogue: dict[str, np.ndarray]
    eval_set: EvalSet | None  # rank 0 only
    steps_per_epoch: int


def setup(cfg: Config, run_dir: Path, device: torch.device, world_size: int, rank: int,
          wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> Setup:
    """Build model, task, optimiser and evaluation data for one worker."""
    torch.manual_seed(cfg.train.seed)
    run = RunDir(run_dir)
    run.require_prepared()
    fitted = FeatureStateSet.load(run.feature_state)
    model = build_two_tower(cfg.model, fitted, cfg.sequence).to(device)
    catalogue = read_catalogue(run)
    num_items = len(next(iter(catalogue.values())))
    counts = item_counts(run, num_items)
    if cfg.sequence.enabled:
        module = wrap(SequenceTrainModule(model))
        task = SequenceTask(cfg, counts, to_tensors(catalogue), history_keys(model),
                            seed=cfg.train.seed)
    else:
        module = wrap(TrainModule(model))
        task = RetrievalTask(cfg.loss, counts, to_tensors(catalogue), seed=cfg.train.seed,
                             weighted=cfg.data.weight is not None)
    train_rows = read_prepare_manifest(run).rows.get(training_split(cfg), 0)
    if not train_rows:
        raise ValueError(f"{run.prepared} has no {training_split(cfg)} rows to train on: "
                         "re-run `python -m jobs.prepare` with this config")
    steps = max(1, train_rows // max(1, world_size) // cfg.train.batch_size)
    opt = make_optimizer(module, cfg.train)
    scheduler = make_scheduler(opt, cfg.train, steps * cfg.train.epochs)
    eval_set = load_eval_set(run, "validation") if rank == 0 else None
    return Setup(cfg, run, fitted, model, module, task, opt, scheduler, device,
                 catalogue, eval_set, steps)


def finish_epoch(s: Setup, state: ckpt.TrainState, stats: dict[str, float]
                 ) -> tuple[dict[str, float], bool, bool]:
    """Validation metrics, early-stopping bookkeeping; returns (metrics, is_best, stop).

    Called on rank 0 only (it holds the evaluation data).
    """
    state.epoch += 1
    state.step += int(stats["steps"])
    metrics = {"epoch": state.epoch, "train/loss": stats["loss"],
               "train/samples_per_s": stats["samples_per_s"], "train/lr": stats["lr"],
               "train/rows": stats["rows"], "train/seconds": stats["seconds"]}
    t0 = time.perf_counter()
    metrics.update(flat_metrics(evaluate(s.model, s.eval_set, s.catalogue, s.device), "val"))
    metrics["val/seconds"] = time.perf_counter() - t0
    score = metrics[f"val/{s.cfg.train.early_stopping_metric}"]
    is_best = score > state.best_metric
    if is_best:
        state.best_metric, state.best_epoch, state.bad_epochs = score, state.epoch, 0
    else:
        state.bad_epochs += 1
    state.history.append(metrics)
    stop = state.bad_epochs >= s.cfg.train.patience or state.epoch >= s.cfg.train.epochs
    return metrics, is_best, stop


def checkpoint_meta(s: Setup, metrics: dict[str, float], is_best: bool = False) -> ModelMeta:
    """What every checkpoint carries besides the weights."""
    return ModelMeta(config=s.cfg, feature_state_hash=s.fitted.content_hash(),
                     model_version=model_version(s.model), metrics=metrics, is_best=is_best)


def flat_metrics(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``{"masked": {"HR@10": x}}`` -> ``{"val/HR@10": x, "val/unmasked/HR@10": ...}``."""
    out = {f"{prefix}/{k}": v for k, v in metrics["masked"].items()}
    out.update({f"{prefix}/unmasked/{k}": v for k, v in metrics["unmasked"].items()})
    return out


def describe(metrics: dict[str, float]) -> str:
    """One progress line for an epoch."""
    keys = ("train/loss", "train/samples_per_s", "val/HR@10", "val/HR@50", "val/NDCG@10")
    return " ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


def run_plain(cfg: Config, run_dir: Path, log: Log = print,
              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train in this process, without Ray: the same step over the same data.

    The best epoch is saved under ``RUN_DIR/plain/best`` and published to ``RUN_DIR/model/``.
    """
    device = torch.device(device)
    s = setup(cfg, run_dir, device, world_size=1, rank=0)
    columns = train_columns(s.run, cfg)
    state, best_dir = ckpt.TrainState(), s.run.plain_best
    rng = np.random.default_rng(cfg.train.seed)
    tracker = Tracker(cfg, run_dir)
    while True:
        order = rng.permutation(len(next(iter(columns.values()))))
        batches = (to_tensors(b) for b in iterate_batches(
            columns, cfg.train.batch_size, order, drop_last=True))
        stats = train_epoch(s.module, s.task, batches, s.opt, s.scheduler, cfg.train, device)
        metrics, is_best, stop = finish_epoch(s, state, stats)
        log(f"[train] epoch {state.epoch}/{cfg.train.epochs} {describe(metrics)}")
        tracker.log(metrics, step=state.epoch)
        if is_best:
            ckpt.save_checkpoint(best_dir, s.model, None, None, state, checkpoint_meta(s, metrics))
        if stop:
            break
    tracker.close()
    ckpt.publish_model(best_dir, s.run)
    return {"best_epoch": state.best_epoch, "best_metric": state.best_metric,
            "history": state.history}
