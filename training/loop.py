"""The training loop shared by Ray Train workers, Ray Tune trials and the plain process.

:func:`setup` builds everything one worker needs from ``RUN_DIR/prepared/`` (the task and
the training data are each chosen in one place: :func:`make_task` and
:func:`training.data.train_table`);
:func:`train_one_epoch` walks the worker's shard once (figures combined over workers);
:func:`finish_epoch` evaluates on the validation targets, applies early stopping and says
whether this epoch is the new best; :func:`epochs` chains the two in one process, and
:func:`run_plain` trains with no Ray at all (``python -m jobs.train --no-ray``), over the
same step and the same data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from indexing.batches import to_tensors
from indexing.eval_set import EvalSet, load_eval_set, train_item_counts
from indexing.evaluate import evaluate
from pipeline.columns import ITEM, SEQUENCE_ITEMS, column_name
from pipeline.config import Config
from pipeline.config.model import IdInit
from pipeline.run_dir import ModelMeta, RunDir, read_catalogue, require_prepared_as
from pipeline.state import FeatureStateSet
from towers.model import build_two_tower, model_version
from training import checkpoint as ckpt
from training.data import (
    epoch_batches,
    load_shard,
    shard_rows,
    train_table,
    uses_length_pools,
    window_lengths,
)
from training.distributed import epoch_stats_over_ranks
from training.item_init import init_item_ids
from training.sequence import SequenceTask, SequenceTrainModule, history_keys
from training.step import Task, make_optimizer, make_scheduler, train_epoch, weight_average
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
    task: Task  # RetrievalTask, or SequenceTask in the sequence mode
    opt: torch.optim.Optimizer
    scheduler: Any
    device: torch.device
    catalogue: dict[str, np.ndarray]
    eval_set: EvalSet | None  # rank 0 only; None when refit (validation is training data)
    shard: dict[str, torch.Tensor]  # this worker's training rows, [R, ...] each
    steps_per_epoch: int
    averaged: nn.Module | None = None  # the weights' moving average (train.average_epochs)
    pools: bool = False  # sequence.length_pools, resolved for this data
    resolved: tuple[str, ...] = ()  # the settings resolved from the data, as logged

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are validated, saved as the model and served."""
        return self.averaged.module if self.averaged is not None else self.model

    def update_average(self) -> None:
        """One step of the weights' moving average (after each optimizer step)."""
        self.averaged.update_parameters(self.model)

    def save(self, path: Path, state: ckpt.TrainState, meta: ModelMeta,
             optimizer: bool = True) -> None:
        """A checkpoint of the served weights.

        With ``optimizer`` it also holds what resuming needs: the optimizer's state and,
        when they differ from the served ones, the stepped weights.
        """
        if optimizer:
            ckpt.save_checkpoint(path, self.eval_model, self.opt, self.scheduler, state, meta,
                                 raw=self.model if self.averaged is not None else None)
        else:
            ckpt.save_checkpoint(path, self.eval_model, None, None, state, meta)

    def restore(self, path: Path) -> ckpt.TrainState:
        """Resume from a checkpoint :meth:`save` wrote; the weight average goes on."""
        state = ckpt.load_checkpoint(path, self.eval_model, self.opt, self.scheduler,
                                     raw=self.model if self.averaged is not None else None)
        if self.averaged is not None:
            self.averaged.n_averaged.fill_(max(1, state.step))
        return state


def make_task(cfg: Config, run: RunDir, catalogue: dict[str, np.ndarray], model: nn.Module
              ) -> tuple[nn.Module, Task]:
    """The module to step and the training task of this config (chosen here only).

    The interaction rows' retrieval task, or the sequence mode's over windows.
    """
    num_items = len(next(iter(catalogue.values())))
    counts = train_item_counts(run, num_items, cfg.train.refit)
    if cfg.sequence.enabled:
        return SequenceTrainModule(model), SequenceTask(
            cfg, counts, to_tensors(catalogue), history_keys(model), seed=cfg.train.seed)
    return TrainModule(model), RetrievalTask(
        cfg.loss, counts, to_tensors(catalogue), seed=cfg.train.seed,
        weighted=cfg.data.weight is not None)


def item_ids(model: nn.Module, catalogue: dict[str, np.ndarray], run: RunDir, cfg: Config
             ) -> None:
    """``model.item_id_init: svd``: the item id table from the training interactions.

    Every rank computes the same factors (same data and seed); DDP also starts every rank
    from rank 0's weights. The config refused svd without an item id feature, by the rule
    that picks ``encoder.id_name`` (the plan's ``item.id_feature``).
    """
    encoder = model.item_tower.encoder
    column = column_name(ITEM, encoder.id_name)
    init_item_ids(id_table(model), catalogue[column], run, cfg.model.embedding_init_std,
                  cfg.train.seed, cfg.train.refit)


def id_table(model: nn.Module) -> nn.Embedding:
    """The item tower's id table (the config refused the settings that need one without)."""
    encoder = model.item_tower.encoder
    return encoder.table(encoder.id_name)


def setup(cfg: Config, run_dir: Path, device: torch.device, world_size: int, rank: int,
          wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> Setup:
    """Build model, task, optimiser, this worker's training shard and evaluation data."""
    torch.manual_seed(cfg.train.seed)
    run = RunDir(run_dir)
    manifest = require_prepared_as(run, cfg)
    fitted = FeatureStateSet.load(run.feature_state)
    model = build_two_tower(cfg.model, fitted, cfg.plan)
    catalogue = read_catalogue(run)
    if cfg.model.item_id_init is IdInit.SVD:
        item_ids(model, catalogue, run, cfg)
    model = model.to(device)
    module, task = make_task(cfg, run, catalogue, model)
    module = wrap(module)
    shard = load_shard(train_table(run, cfg), rank, world_size)
    steps = shard_rows(shard) // cfg.train.batch_size
    if steps == 0:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is larger than the "
                         f"{shard_rows(shard)} training rows of each of the {world_size} "
                         "worker(s): lower it or use fewer workers")
    scale = cfg.model.item_id_lr_scale
    opt = make_optimizer(module, cfg.train,
                         (id_table(model).weight, scale) if scale != 1.0 else None)
    scheduler = make_scheduler(opt, cfg.train, steps * cfg.train.epochs)
    eval_set = load_eval_set(run, "validation") if rank == 0 and not cfg.train.refit else None
    pools, why = False, ()
    if cfg.sequence.enabled:
        pools, line = uses_length_pools(cfg.sequence.length_pools, manifest.median_history,
                                        shard[SEQUENCE_ITEMS].shape[1] - 1)
        why = (line,)
    return Setup(cfg, run, fitted, model, module, task, opt, scheduler, device,
                 catalogue, eval_set, shard, steps, weight_average(model, cfg.train, steps),
                 pools, why)


def train_one_epoch(s: Setup, state: ckpt.TrainState) -> dict[str, float]:
    """Train over this worker's shard once, in the order of epoch ``state.epoch``.

    Returns the epoch's figures for the whole worker group (every rank gets the same).
    """
    lengths = window_lengths(s.shard) if s.pools else None
    batches = epoch_batches(s.shard, s.cfg.train.batch_size, s.cfg.train.seed, state.epoch,
                            lengths)
    stats = train_epoch(s.module, s.task, batches, s.opt, s.scheduler, s.cfg.train, s.device,
                        after_step=s.update_average if s.averaged is not None else None)
    return epoch_stats_over_ranks(stats, s.device)


def finish_epoch(s: Setup, state: ckpt.TrainState, stats: dict[str, float]
                 ) -> tuple[dict[str, float], bool, bool]:
    """Validation metrics, early-stopping bookkeeping; returns (metrics, is_best, stop).

    Called on rank 0 only (it holds the evaluation data). A refit run
    (``train.refit``) has no validation targets left to score: each epoch is the newest
    model, so the last one is the model, after exactly ``train.epochs``.
    """
    state.epoch += 1
    state.step += int(stats["steps"])
    metrics = {"epoch": state.epoch, "train/loss": stats["loss"],
               "train/samples_per_s": stats["samples_per_s"], "train/lr": stats["lr"],
               "train/rows": stats["rows"], "train/seconds": stats["seconds"],
               "train/threads": torch.get_num_threads()}
    if s.cfg.train.refit:
        state.history.append(metrics)
        state.best_epoch = state.epoch
        return metrics, True, finished(s.cfg, state)
    t0 = time.perf_counter()
    metrics.update(flat_metrics(evaluate(s.eval_model, s.eval_set, s.catalogue, s.device), "val"))
    metrics["val/seconds"] = time.perf_counter() - t0
    state.history.append(metrics)
    is_best = track_progress(state, metrics[f"val/{s.cfg.train.early_stopping_metric}"],
                             s.cfg.train.min_improvement)
    return metrics, is_best, finished(s.cfg, state)


def track_progress(state: ckpt.TrainState, score: float, min_improvement: float) -> bool:
    """Early-stopping bookkeeping for one epoch's score; returns whether it is the best yet.

    Progress is a score at least ``min_improvement`` above the score of the last progress
    (the first epoch always is); ``state.bad_epochs`` counts the epochs since. The best
    epoch is the highest score, however small its lead.
    """
    if score >= state.progress_metric + min_improvement:
        state.progress_metric, state.bad_epochs = score, 0
    else:
        state.bad_epochs += 1
    if score > state.best_metric:
        state.best_metric, state.best_epoch = score, state.epoch
        return True
    return False


def finished(cfg: Config, state: ckpt.TrainState) -> bool:
    """Whether training is over: every epoch done, or patience run out."""
    return state.epoch >= cfg.train.epochs or state.bad_epochs >= cfg.train.patience


def epochs(s: Setup, state: ckpt.TrainState) -> Iterator[tuple[dict[str, float], bool]]:
    """Train epoch after epoch in this process; yields ``(metrics, is_best)`` per epoch.

    Ends after ``train.epochs`` or when early stopping says so; a caller may stop early
    (a Tune scheduler does).
    """
    while not finished(s.cfg, state):
        metrics, is_best, _ = finish_epoch(s, state, train_one_epoch(s, state))
        yield metrics, is_best


def selection_metric(cfg: Config) -> str:
    """The reported figure whose highest value marks the model.

    ``val/<early stopping metric>``, or ``epoch`` for a refit run (the last is the model).
    """
    return "epoch" if cfg.train.refit else f"val/{cfg.train.early_stopping_metric}"


def checkpoint_meta(s: Setup, metrics: dict[str, float], is_best: bool = False) -> ModelMeta:
    """What every checkpoint carries besides the weights."""
    return ModelMeta(config=s.cfg, plan=s.cfg.plan,
                     feature_state_hash=s.fitted.content_hash(),
                     model_version=model_version(s.eval_model), metrics=metrics,
                     is_best=is_best)


def flat_metrics(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``{"masked": {"HR@10": x}}`` -> ``{"val/HR@10": x, "val/unmasked/HR@10": ...}``."""
    out = {f"{prefix}/{k}": v for k, v in metrics["masked"].items()}
    out.update({f"{prefix}/unmasked/{k}": v for k, v in metrics["unmasked"].items()})
    return out


def describe(metrics: dict[str, float], cfg: Config, state: ckpt.TrainState) -> str:
    """The one progress line of an epoch (the figures are the whole worker group's)."""
    line = (f"[train] epoch {int(metrics['epoch'])}/{cfg.train.epochs} "
            f"loss {metrics['train/loss']:.4f} | {metrics['train/samples_per_s']:,.0f} samples/s "
            f"({metrics['train/seconds']:.1f}s) | val")
    if cfg.train.refit:
        return line + " none (train.refit: the validation targets are training data)"
    for key in ("HR@10", "HR@50", "NDCG@10"):
        line += f" {key} {metrics[f'val/{key}']:.4f}"
    line += f" ({metrics['val/seconds']:.1f}s)"
    if finished(cfg, state) and state.epoch < cfg.train.epochs:
        line += (f" | early stop: val/{cfg.train.early_stopping_metric} rose less than "
                 f"{cfg.train.min_improvement} for {state.bad_epochs} epochs")
    return line


def run_plain(cfg: Config, run_dir: Path, log: Log = print,
              device: str | torch.device = "cpu") -> dict[str, Any]:
    """Train in this process, without Ray: the same step over the same data.

    The best epoch is saved under ``RUN_DIR/plain/best`` and published to ``RUN_DIR/model/``.
    Each epoch also replaces ``RUN_DIR/plain/latest`` (weights, optimizer, loop state), and
    a run started again on the same RUN_DIR resumes after that epoch, as Ray Train does.
    The checkpoints are written before the epoch goes to MLflow, so a killed run that
    resumes never logs an epoch twice.
    """
    s = setup(cfg, run_dir, torch.device(device), world_size=1, rank=0)
    for line in s.resolved:
        log(f"[train] {line}")
    best_dir, latest_dir = s.run.plain_best, s.run.plain_latest
    state = ckpt.TrainState()
    if (latest_dir / ckpt.META_FILE).exists():
        state = s.restore(latest_dir)
        log(f"[train] resuming after epoch {state.epoch} from {latest_dir}")
    tracker = Tracker(cfg, run_dir)
    for metrics, is_best in epochs(s, state):
        if is_best:
            s.save(best_dir, state, checkpoint_meta(s, metrics), optimizer=False)
        s.save(latest_dir, state, checkpoint_meta(s, metrics, is_best=is_best))
        tracker.log(metrics, step=state.epoch)
        log(describe(metrics, cfg, state))
    tracker.close()
    ckpt.publish_model(best_dir, s.run)
    return {"best_epoch": state.best_epoch, "best_metric": state.best_metric,
            "history": state.history}
