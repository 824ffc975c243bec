"""Training data from ``RUN_DIR/prepared/``: the model columns of the training split.

The interaction mode trains on ``train/`` (one row per interaction), the sequence mode on
``sequences/`` (the same interactions cut into windows per user): :func:`training_split`
is the one place that chooses.
"""

from __future__ import annotations

import numpy as np

from pipeline.columns import ITEM_INDEX, model_columns
from pipeline.config import Config
from pipeline.io import column_to_numpy, table_to_numpy
from pipeline.run_dir import SEQUENCES, RunDir, read_split


def item_counts(run: RunDir, num_items: int) -> np.ndarray:
    """[I] training interactions per catalogue item (for log-Q and popularity sampling)."""
    idx = column_to_numpy(read_split(run, "train", [ITEM_INDEX])[ITEM_INDEX])
    return np.bincount(idx.astype(np.int64), minlength=num_items).astype(np.float64)


def training_split(cfg: Config) -> str:
    """The prepared folder a config trains on: ``sequences`` (sequence mode) or ``train``."""
    return SEQUENCES if cfg.sequence.enabled else "train"


def train_columns(run: RunDir, cfg: Config) -> dict[str, np.ndarray]:
    """The training folder's model columns as numpy (the plain loop's whole epoch)."""
    table = read_split(run, training_split(cfg))
    return table_to_numpy(table, model_columns(table.column_names))
