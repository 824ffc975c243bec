"""Checkpoint and model directories: state_dicts plus JSON, never pickle.

A checkpoint directory (what Ray Train persists) holds ``model.pt`` (the model's
state_dict), ``optimizer.pt`` (optimizer and scheduler state_dicts) and ``meta.json``
(epoch, step, metrics, early-stopping state, model version, feature-state hash and the
resolved config). ``RUN_DIR/model/`` is the best checkpoint without the optimizer: what
``build_index``, ``evaluate`` and the Serve app load.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, parse_config
from pipeline.state import FeatureStateSet
from towers.model import build_two_tower

MODEL_FILE, OPTIM_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint and restored on resume."""

    epoch: int = 0  # epochs completed
    step: int = 0
    best_metric: float = float("-inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def save_checkpoint(path: Path, model: torch.nn.Module, opt, scheduler, state: TrainState,
                    meta: dict[str, Any]) -> None:
    """Write a checkpoint directory (``opt`` None: a model-only directory)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / MODEL_FILE)
    if opt is not None:
        torch.save({"optimizer": opt.state_dict(), "scheduler": scheduler.state_dict()},
                   path / OPTIM_FILE)
    body = dict(meta, train_state=asdict(state))
    (path / META_FILE).write_text(json.dumps(body, indent=1, sort_keys=True))


def read_meta(path: Path) -> dict[str, Any]:
    """The ``meta.json`` of a checkpoint or model directory."""
    file = Path(path) / META_FILE
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing: not a checkpoint or model directory")
    return json.loads(file.read_text())


def load_checkpoint(path: Path, model: torch.nn.Module, opt=None, scheduler=None
                    ) -> TrainState:
    """Load weights (and optimizer state when given) from a checkpoint directory."""
    path = Path(path)
    model.load_state_dict(torch.load(path / MODEL_FILE, map_location="cpu", weights_only=True))
    if opt is not None and (path / OPTIM_FILE).exists():
        saved = torch.load(path / OPTIM_FILE, map_location="cpu", weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    return TrainState(**read_meta(path)["train_state"])


def publish_model(checkpoint_dir: Path, run_dir: Path) -> Path:
    """Copy a checkpoint's weights and meta to ``RUN_DIR/model/`` (atomically replaced)."""
    out, tmp = Path(run_dir) / "model", Path(run_dir) / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (MODEL_FILE, META_FILE):
        shutil.copy2(Path(checkpoint_dir) / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def load_model(run_dir: Path, device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any], FeatureStateSet, Config]:
    """The trained model of a run directory, in eval mode, with its meta and state.

    Raises:
        ValueError: the model was trained on another feature state than ``prepared/``.
    """
    run_dir = Path(run_dir)
    meta = read_meta(run_dir / "model")
    cfg = parse_config(meta["config"], source=str(run_dir / "model" / META_FILE))
    fitted = FeatureStateSet.load(run_dir / "prepared" / "feature_state.json")
    if fitted.content_hash() != meta["feature_state_hash"]:
        raise ValueError(f"{run_dir}/model was trained on feature state "
                         f"{meta['feature_state_hash']}, but prepared/ holds "
                         f"{fitted.content_hash()}: re-run jobs.train")
    model = build_two_tower(cfg.model, fitted)
    load_checkpoint(run_dir / "model", model)
    return model.to(device).eval(), meta, fitted, cfg
