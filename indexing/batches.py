"""Numpy columns -> torch batches, and in-process embedding of a table with one tower.

Training, evaluation and the batch jobs turn prepared columns into tensors here; a
tower reads its own keys through :func:`pipeline.columns.tower_inputs`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import numpy as np
import torch

from pipeline.columns import tower_inputs


def to_tensors(batch: Mapping[str, np.ndarray], device: torch.device | str = "cpu"
               ) -> dict[str, torch.Tensor]:
    """Numpy columns -> tensors on ``device`` (copies: Ray's zero-copy arrays are read-only)."""
    return {k: torch.as_tensor(np.array(v, copy=True)).to(device) for k, v in batch.items()}


def iterate_batches(columns: Mapping[str, np.ndarray], batch_size: int,
                    order: np.ndarray | None = None, drop_last: bool = False
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{column: [b, ...]}`` numpy slices in ``order`` (default: row order)."""
    n = len(next(iter(columns.values())))
    order = np.arange(n) if order is None else order
    stop = n - (n % batch_size) if drop_last else n
    for s in range(0, stop, batch_size):
        rows = order[s:s + batch_size]
        yield {k: v[rows] for k, v in columns.items()}


@torch.no_grad()
def embed(encode: Callable[[dict], torch.Tensor], columns: Mapping[str, np.ndarray],
          tower: str, device: torch.device | str = "cpu", batch_size: int = 4096
          ) -> torch.Tensor:
    """Embed every row of ``columns`` (prefixed prepared columns) with one tower: [N, D]."""
    out = []
    for batch in iterate_batches(columns, batch_size):
        out.append(encode(tower_inputs(to_tensors(batch, device), tower)).float().cpu())
    return torch.cat(out)
