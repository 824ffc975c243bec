"""Checkpoint and model directories: state_dicts plus JSON, never pickle.

A checkpoint directory (what Ray Train persists) holds ``model.pt`` (the model's
state_dict: the weights' moving average when ``train.average_epochs`` is set),
``optimizer.pt`` (optimizer and scheduler state_dicts, and then the raw weights the
optimizer steps, to resume from) and ``meta.json``
(:class:`pipeline.run_dir.ModelMeta`: epoch state, metrics, model version, feature-state
hash and the resolved config). ``RUN_DIR/model/`` is the best checkpoint without the
optimizer, plus each tower exported as a standalone program (``towers.export``): what
``build_index``, ``evaluate`` and the Serve app load.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline.columns import TOWERS
from pipeline.run_dir import (
    META_FILE,
    MODEL_FILE,
    OPTIM_FILE,
    ModelMeta,
    RunDir,
    atomic_dir,
    read_model_meta,
    write_json,
)


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0  # epochs since the metric last rose by train.min_improvement
    progress_metric: float = float("-inf")  # the metric at that last rise
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(path: Path, model: torch.nn.Module, opt, scheduler, state: TrainState,
                    meta: ModelMeta, raw: torch.nn.Module | None = None) -> None:
    """Write a checkpoint directory (``opt`` None: a model-only directory), atomically.

    The files go to a folder beside ``path`` that then replaces it, so a failed write (a
    full disk, a kill) leaves the previous checkpoint whole, never a torn ``model.pt``.

    ``raw``: the stepped weights when ``model`` is their moving average (saved beside the
    optimizer, for resuming).
    """
    path = Path(path)
    try:
        with atomic_dir(path) as tmp:
            torch.save(model.state_dict(), tmp / MODEL_FILE)
            if opt is not None:
                saved = {"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()}
                if raw is not None:
                    saved["raw_model"] = raw.state_dict()
                torch.save(saved, tmp / OPTIM_FILE)
            body = meta.model_copy(update={"train_state": asdict(state)})
            write_json(tmp / META_FILE, body.model_dump(mode="json"))
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise OSError(f"cannot write the checkpoint {path}: {reason}; the previous "
                      "checkpoint there, if any, is kept (disk full or not writable?)") from None


def load_checkpoint(path: Path, model: torch.nn.Module, opt=None, scheduler=None,
                    raw: torch.nn.Module | None = None) -> TrainState:
    """Load weights (and optimizer state when given) from a checkpoint directory.

    ``raw``: the stepped weights when ``model`` is their moving average; they are loaded
    from the saved raw weights (or from ``model.pt`` when the checkpoint has none).
    """
    path = Path(path)
    weights = torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    saved = {}
    if opt is not None and (path / OPTIM_FILE).exists():
        saved = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    if raw is not None:
        raw.load_state_dict(saved.get("raw_model", weights))
    return train_state(path)


def train_state(path: Path) -> TrainState:
    """The loop state saved in a checkpoint directory's ``meta.json``."""
    return TrainState(**read_model_meta(path).train_state)


def publish_model(checkpoint_dir: Path, run: RunDir) -> Path:
    """Copy a checkpoint's weights and meta to ``RUN_DIR/model/`` with both towers exported.

    The folder is replaced atomically: a server never sees weights without their programs.
    """
    from towers.export import export_trained

    with atomic_dir(run.model) as tmp:
        for name in (MODEL_FILE, META_FILE):
            shutil.copy2(Path(checkpoint_dir) / name, tmp / name)
        export_trained(RunDir(run.root), tmp, TOWERS)
    return run.model
