"""The evaluation targets of a split with each user's history (EVALUATION.md's protocol)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.arrow import column_to_numpy, table_to_numpy
from pipeline.columns import ITEM_INDEX, USER, USER_KEY, tower_columns
from pipeline.run_dir import RunDir, read_split, read_trained


@dataclass
class EvalSet:
    """One target per user with that user's history, for full-catalogue ranking.

    Attributes:
        user_inputs: encoded user columns (``user__*``), [U, ...] each.
        targets: [U] catalogue row of each target.
        history_offsets: [U + 1] CSR offsets into ``history_items``.
        history_items: [T] catalogue rows of each user's history (masked when ranking).
    """

    user_inputs: dict[str, np.ndarray]
    targets: np.ndarray
    history_offsets: np.ndarray
    history_items: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def train_item_counts(run: RunDir, num_items: int, refit: bool = False) -> np.ndarray:
    """[I] training interactions per catalogue item (popularity, log-Q, negative sampling).

    ``refit``: count the validation interactions too (what a refit model trains on).
    """
    idx = column_to_numpy(read_trained(run, refit, [ITEM_INDEX])[ITEM_INDEX])
    return np.bincount(idx.astype(np.int64), minlength=num_items).astype(np.float64)


def load_eval_set(run: RunDir, split_name: str) -> EvalSet:
    """Targets of ``validation`` or ``test`` with the history EVALUATION.md defines.

    A validation target's history is the user's training rows; a test target's history
    is training plus validation rows.
    """
    if split_name not in ("validation", "test"):
        raise ValueError(f"evaluation split {split_name!r}: expected 'validation' or 'test'")
    targets = read_split(run, split_name)
    history_splits = ["train"] if split_name == "validation" else ["train", "validation"]
    hist = pa.concat_tables([read_split(run, s, [USER_KEY, ITEM_INDEX])
                             for s in history_splits])
    user_ids = targets[USER_KEY].combine_chunks()
    owner = pc.index_in(hist[USER_KEY], value_set=user_ids).to_numpy(zero_copy_only=False)
    owner = np.where(np.isnan(owner.astype(float)), -1, owner).astype(np.int64)
    keep = owner >= 0
    items = column_to_numpy(hist[ITEM_INDEX])[keep].astype(np.int64)
    order = np.argsort(owner[keep], kind="stable")
    counts = np.bincount(owner[keep], minlength=len(user_ids))
    return EvalSet(user_inputs=table_to_numpy(targets, tower_columns(targets.column_names, USER)),
                   targets=column_to_numpy(targets[ITEM_INDEX]).astype(np.int64),
                   history_offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
                   history_items=items[order])
