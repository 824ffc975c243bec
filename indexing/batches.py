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
    """Embed every row of ``columns`` (prefixed prepared columns) with one tower: [N, D].

    Rows are embedded in order of their padded sequences' lengths (:func:`length_order`)
    and put back in row order: a sequence body cuts the padding every row of a batch
    shares, so short histories batched together cost their own length, not the longest.
    """
    order = length_order(columns)
    out = [encode(tower_inputs(to_tensors(batch, device), tower)).float().cpu()
           for batch in iterate_batches(columns, batch_size, order)]
    result = torch.cat(out)
    if order is None:
        return result
    placed = torch.empty_like(result)
    placed[torch.from_numpy(order)] = result
    return placed


def length_order(columns: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """[N] rows by descending count of non-padding ids in their 2-d integer columns.

    Sequence ids are padded in front with 0; None when no column is a sequence (the row
    order is then as good as any).
    """
    seqs = [v for v in columns.values()
            if isinstance(v, np.ndarray) and v.ndim == 2 and v.dtype.kind in "iu"]
    if not seqs:
        return None
    lengths = sum((v != 0).sum(1) for v in seqs)
    return np.argsort(-lengths, kind="stable")
