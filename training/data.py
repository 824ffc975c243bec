"""Training data from ``RUN_DIR/prepared/``: each worker's shard of the training table as tensors.

The training table is chosen in one place (:func:`train_table`): ``train/`` (one row
per interaction; with ``train.refit``, ``validation/`` too) or, in the sequence mode,
``sequences/`` (the same interactions cut into windows per user). Each worker reads the
model columns of its own rows once (:func:`load_shard`), holds them as tensors, and walks
them in a new order every epoch (:func:`epoch_batches`); the plain loop is the one-worker
case of the same functions. Rank ``r`` of ``W`` owns the rows ``i`` with ``i % W == r``,
cut to the same count on every rank, so every rank takes the same number of steps. An
epoch's order comes from ``(train.seed, epoch)`` alone: a restarted worker replays it, and
the ranks of a DDP run draw the same order over their equally long shards, so the global
batch ``k`` is rank 0's batch ``k`` followed by rank 1's (``tests/test_train.py`` checks DDP
against one process stepping those global batches).

Why not a Ray Data shard per epoch (see README "Training throughput"): on ML-100K the
per-batch iteration and its tensor conversion cost more than the step itself, and the
driver-side materialisation added seconds to every ``fit()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from indexing.batches import to_tensors
from pipeline.arrow import table_to_numpy
from pipeline.columns import SEQUENCE_ITEMS, model_columns
from pipeline.config import Config
from pipeline.run_dir import SEQUENCES, RunDir, trained_splits

BUCKET_POOL = 64  # batches per length-sorted pool (bucketed_order)


def train_table(run: RunDir, cfg: Config) -> list[Path]:
    """The folders of Parquet training examples one epoch walks, in order.

    ``prepared/train/`` (and ``prepared/validation/`` when ``train.refit``), or
    ``prepared/sequences/`` when ``cfg.sequence`` is enabled (prepare cut the windows from
    the same splits, :func:`pipeline.splits.trained_on`).
    """
    if cfg.sequence.enabled:
        return [run.split(SEQUENCES)]
    return [run.split(name) for name in trained_splits(cfg.train.refit)]


def parquet_files(folder: Path) -> list[Path]:
    """The table's Parquet files in path order (the row order every rank agrees on)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is missing: run `python -m jobs.prepare` first")
    files = sorted(folder.rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .parquet file: run `python -m jobs.prepare`")
    return files


def load_shard(folders: Sequence[Path], rank: int = 0, world: int = 1
               ) -> dict[str, torch.Tensor]:
    """The model columns of rank ``rank``'s rows of a training table, as tensors.

    Rows are read file by file in batches and only this rank's rows are kept, so a worker
    holds 1/W of the table (plus one read batch).

    Args:
        folders: the training table's folders (:func:`train_table`).
        rank: this worker's rank.
        world: the number of workers W.

    Returns:
        ``{column: [R, ...]}`` with R = floor(rows / W) on every rank.

    Raises:
        ValueError: the table has fewer rows than workers (names the folders).
    """
    files = [f for folder in folders for f in parquet_files(folder)]
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    per_rank = total // world
    if per_rank == 0:
        raise ValueError(f"{', '.join(map(str, folders))} hold {total} training rows, fewer "
                         f"than the {world} workers (train.num_workers): prepare more data or "
                         "use fewer workers")
    names = model_columns(pq.read_schema(files[0]).names)
    parts, offset = [], 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(columns=names):
            rows = offset + np.arange(batch.num_rows)
            mine = np.flatnonzero((rows % world == rank) & (rows // world < per_rank))
            parts.append(batch.take(pa.array(mine)))
            offset += batch.num_rows
    table = pa.Table.from_batches(parts, schema=parts[0].schema)
    return to_tensors(table_to_numpy(table, names))


def shard_rows(shard: Mapping[str, torch.Tensor]) -> int:
    """Rows held by a shard."""
    return len(next(iter(shard.values())))


def epoch_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
    """[rows] the order of epoch ``epoch`` (0-based): a permutation drawn from (seed, epoch)."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(rows))


def bucketed_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                   pool_batches: int = BUCKET_POOL) -> torch.Tensor:
    """[rows] an epoch's order whose batches hold windows of similar length.

    The rows are permuted as :func:`epoch_order` does, cut into pools of ``pool_batches``
    batches, each pool sorted by length (stable) and cut into batches, and the batches
    shuffled: every batch is still a random draw of its pool, but its windows need about
    the same number of positions, so the padding the step trims (histories are padded in
    front) is most of a short-history batch. The order depends on (seed, epoch) alone.

    Args:
        lengths: [rows] real positions of each window.
        batch_size: B.
        seed: ``train.seed``.
        epoch: the 0-based epoch.
        pool_batches: batches per sorted pool.
    """
    order = epoch_order(len(lengths), seed, epoch).numpy()
    pool = batch_size * pool_batches
    parts = [chunk[np.argsort(-lengths[chunk], kind="stable")]
             for chunk in np.split(order, range(pool, len(order), pool))]
    order = np.concatenate(parts)
    whole = len(order) // batch_size
    batches = order[:whole * batch_size].reshape(whole, batch_size)
    rng = np.random.default_rng([seed, epoch, 1])
    return torch.from_numpy(np.concatenate([batches[rng.permutation(whole)].reshape(-1),
                                            order[whole * batch_size:]]))


def epoch_batches(shard: Mapping[str, torch.Tensor], batch_size: int, seed: int, epoch: int,
                  lengths: np.ndarray | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The whole batches of one epoch over a shard (a last partial batch is dropped).

    Args:
        shard: ``{column: [R, ...]}`` (:func:`load_shard`).
        batch_size: B, rows per batch.
        seed: ``train.seed``.
        epoch: the 0-based epoch; with ``seed`` it fixes the order.
        lengths: [R] real positions of each window: batches of similar lengths
            (:func:`bucketed_order`); None: a plain permutation.

    Yields:
        ``{column: [B, ...]}``, each a fresh tensor (the step may write to it).
    """
    rows = shard_rows(shard)
    order = (epoch_order(rows, seed, epoch) if lengths is None
             else bucketed_order(lengths, batch_size, seed, epoch))
    for start in range(0, rows - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        yield {k: v.index_select(0, idx) for k, v in shard.items()}


POOL_HISTORY_FRACTION = 0.25  # auto: pools when the median history is under this of the window


def uses_length_pools(setting: bool | str, median_history: float | None, max_length: int
                      ) -> tuple[bool, str]:
    """``sequence.length_pools`` resolved for this data, and why (logged by the loops).

    ``auto`` turns the pools on when the median user history (prepare's manifest) is under
    ``POOL_HISTORY_FRACTION`` of the windows' ``max_length``: most windows are then mostly
    padding, which a batch of like lengths cuts (Amazon Sports: median 6 of 50). On long
    histories (MovieLens-100K: 65 of 100) batches of one length change what a step averages
    over, and cost validation NDCG@10 (docs/experiments.md, 2026-12-07).
    """
    if setting != "auto":
        return bool(setting), f"sequence.length_pools: {str(setting).lower()}"
    if median_history is None:
        return False, "sequence.length_pools: auto -> off (the run's manifest has no median " \
                      "history: prepared by an older version)"
    on = median_history < POOL_HISTORY_FRACTION * max_length
    return on, (f"sequence.length_pools: auto -> {'on' if on else 'off'} (median history "
                f"{median_history:g} {'<' if on else '>='} {POOL_HISTORY_FRACTION:g} x "
                f"max_length {max_length})")


def window_lengths(shard: Mapping[str, torch.Tensor]) -> np.ndarray:
    """[R] real items of each window of a ``sequences/`` shard."""
    return (shard[SEQUENCE_ITEMS] >= 0).sum(1).numpy()
