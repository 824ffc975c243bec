"""Prepared Parquet -> model inputs (pyarrow, numpy and torch; no Ray here).

The prepared splits carry every encoded feature as ``user__NAME`` / ``item__NAME``
columns (see :mod:`pipeline.prepare`). A tower takes the columns of its prefix with the
prefix removed (:func:`tower_inputs`); this is the one place that mapping is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

USER, ITEM = "user", "item"
ITEM_INDEX = "item_index"


def prefix(tower: str) -> str:
    """Column prefix of a tower's encoded features (``user__``)."""
    return f"{tower}__"


def model_columns(schema_names: list[str]) -> list[str]:
    """The columns a training batch needs: both towers' features and the item index."""
    return [c for c in schema_names
            if c.startswith((prefix(USER), prefix(ITEM))) or c == ITEM_INDEX]


def tower_inputs(batch: Mapping[str, torch.Tensor], tower: str) -> dict[str, torch.Tensor]:
    """A tower's feature tensors from a batch of prepared columns (prefix removed)."""
    p = prefix(tower)
    return {k[len(p):]: v for k, v in batch.items() if k.startswith(p)}


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An Arrow column as numpy; fixed-size lists become ``[N, L]`` arrays."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(arr), width)
    return arr.to_numpy(zero_copy_only=False)


def table_to_numpy(table: pa.Table, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Selected columns of a table as numpy arrays."""
    return {c: column_to_numpy(table[c]) for c in (columns or table.column_names)}


def to_tensors(batch: Mapping[str, np.ndarray], device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
    """Numpy columns -> tensors on ``device`` (copies: Ray's zero-copy arrays are read-only)."""
    return {k: torch.as_tensor(np.array(v, copy=True)).to(device) for k, v in batch.items()}


def read_split(prepared: Path, name: str, columns: list[str] | None = None) -> pa.Table:
    """One split folder of the prepared data (all its files, in path order)."""
    path = Path(prepared) / name
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.prepare` first")
    return pads.dataset(str(path), format="parquet").to_table(columns=columns)


def read_catalogue(prepared: Path) -> dict[str, np.ndarray]:
    """The encoded catalogue (row number = item_index) as numpy columns."""
    table = pq.read_table(Path(prepared) / "items.parquet")
    return table_to_numpy(table, [c for c in table.column_names if c.startswith(prefix(ITEM))])


def item_counts(prepared: Path, num_items: int) -> np.ndarray:
    """[I] training interactions per catalogue item (for log-Q and popularity sampling)."""
    idx = column_to_numpy(read_split(prepared, "train", [ITEM_INDEX])[ITEM_INDEX])
    return np.bincount(idx.astype(np.int64), minlength=num_items).astype(np.float64)


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


def load_eval_set(prepared: Path, split_name: str) -> EvalSet:
    """Targets of ``validation`` or ``test`` with the history EVALUATION.md defines.

    A validation target's history is the user's training rows; a test target's history
    is training plus validation rows.
    """
    if split_name not in ("validation", "test"):
        raise ValueError(f"evaluation split {split_name!r}: expected 'validation' or 'test'")
    targets = read_split(prepared, split_name)
    history_splits = ["train"] if split_name == "validation" else ["train", "validation"]
    hist = pa.concat_tables([read_split(prepared, s, ["user_id", ITEM_INDEX])
                             for s in history_splits])
    user_ids = targets["user_id"].combine_chunks()
    owner = pc.index_in(hist["user_id"], value_set=user_ids).to_numpy(zero_copy_only=False)
    owner = np.where(np.isnan(owner.astype(float)), -1, owner).astype(np.int64)
    keep = owner >= 0
    items = column_to_numpy(hist[ITEM_INDEX])[keep].astype(np.int64)
    order = np.argsort(owner[keep], kind="stable")
    counts = np.bincount(owner[keep], minlength=len(user_ids))
    cols = [c for c in targets.column_names if c.startswith(prefix(USER))]
    return EvalSet(user_inputs=table_to_numpy(targets, cols),
                   targets=column_to_numpy(targets[ITEM_INDEX]).astype(np.int64),
                   history_offsets=np.r_[0, np.cumsum(counts)].astype(np.int64),
                   history_items=items[order])


def iterate_batches(columns: Mapping[str, np.ndarray], batch_size: int,
                    order: np.ndarray | None = None, drop_last: bool = False):
    """Yield ``{column: [b, ...]}`` numpy slices in ``order`` (default: row order)."""
    n = len(next(iter(columns.values())))
    order = np.arange(n) if order is None else order
    stop = n - (n % batch_size) if drop_last else n
    for s in range(0, stop, batch_size):
        rows = order[s:s + batch_size]
        yield {k: v[rows] for k, v in columns.items()}
