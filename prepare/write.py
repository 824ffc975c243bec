"""The writers of the prepare step: Ray Data or in-process, the same rows either way.

:func:`write_splits` maps :func:`prepare.rows.build_rows` over each split's row positions
with Ray Data and writes Parquet; :func:`write_local` writes the same tables from one
process (small data, ``prepare.engine``); :func:`write_tables` writes the encoded catalogue
and the user table (features, latest history and seen items) that serving reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline.arrow import to_arrow_table
from pipeline.columns import ITEM, SEEN, USER, column_name
from pipeline.rows import id_columns
from pipeline.run_dir import TABLES
from pipeline.state import FeatureStateSet
from pipeline.transforms import lookup
from prepare.interactions import Interactions
from prepare.rows import RowBuild, RowContext, outputs, sequence_columns

SplitWriter = Callable[["RowContext", "Interactions", Path, C.Config, Callable[[str], None]],
                       dict[str, int]]  # writes train / validation / test, returns row counts


class _RowBuilder:
    """Ray Data batch function: fetches the context once per worker, then gathers."""

    def __init__(self, ctx_ref, rows_ref, build: RowBuild):
        self._refs = (ctx_ref, rows_ref)
        self._build = build

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import ray

        ctx, rows = ray.get(list(self._refs))
        return to_arrow_table(self._build(rows[batch["id"]], ctx))


def write_splits(ctx: RowContext, inter: Interactions, out: Path, cfg: C.Config,
                 log) -> dict[str, int]:
    """Write the splits (and sequences) as Parquet through Ray Data; returns row counts."""
    import ray

    ctx_ref = ray.put(ctx)
    counts = {}
    for name, rows, build in outputs(ctx, inter, cfg):
        start = time.perf_counter()
        counts[name] = int(len(rows))
        blocks = max(1, -(-len(rows) // cfg.prepare.rows_per_file))
        ds = ray.data.range(len(rows), override_num_blocks=blocks).map_batches(
            _RowBuilder(ctx_ref, ray.put(rows), build), batch_format="numpy",
            batch_size=min(cfg.prepare.rows_per_file, 200_000), num_cpus=cfg.prepare.num_cpus)
        ds.write_parquet(str(out / name), min_rows_per_file=cfg.prepare.rows_per_file)
        log(f"[prepare] wrote {name}: {len(rows):,} rows ({time.perf_counter() - start:.1f}s)")
    return counts


def write_local(ctx: RowContext, inter: Interactions, out: Path, cfg: C.Config,
                log) -> dict[str, int]:
    """Write the splits (and sequences) in this process (no Ray): the same rows."""
    counts = {}
    step = cfg.prepare.rows_per_file
    for name, rows, build in outputs(ctx, inter, cfg):
        start = time.perf_counter()
        counts[name] = int(len(rows))
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(0, max(1, len(rows)), step):
            table = to_arrow_table(build(rows[i:i + step], ctx))
            pq.write_table(table, out / name / f"part-{i // step:05d}.parquet")
        log(f"[prepare] wrote {name}: {len(rows):,} rows ({time.perf_counter() - start:.1f}s)")
    return counts


def write_tables(ctx: RowContext, inter: Interactions, users: pa.Table, items: pa.Table,
                 fitted: FeatureStateSet, out: Path) -> int:
    """Write the encoded catalogue and the per-user serving table; returns the user count."""
    cat = {fitted.item_id: items[fitted.item_id].to_numpy(zero_copy_only=False)}
    cat.update({column_name(ITEM, n): a for n, a in ctx.item_feats.items()})
    pq.write_table(to_arrow_table(cat), out / TABLES[ITEM])
    table = user_table(ctx, inter, users, fitted)
    pq.write_table(table, out / TABLES[USER])
    return table.num_rows


def user_table(ctx: RowContext, inter: Interactions, users: pa.Table,
               fitted: FeatureStateSet) -> pa.Table:
    """Every known user: encoded features, latest history, and all seen catalogue rows.

    Users left out of the splits (below ``prepare.min_user_interactions``) are here too,
    with the history and seen items of all their interactions.
    """
    inter_user, group_start, ctx = _all_histories(ctx, inter)
    starts = np.flatnonzero(np.r_[True, group_start[1:] != group_start[:-1]]) \
        if len(group_start) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(group_start)].astype(np.int64)
    inter_ids = inter_user.take(pa.array(starts))
    table_ids = users[fitted.user_id].combine_chunks()
    extra = inter_ids.filter(pa.compute.invert(pa.compute.is_in(inter_ids, value_set=table_ids)))
    ids = pa.concat_arrays([table_ids.cast(inter_ids.type), extra]) if len(extra) else table_ids
    group = pa.compute.index_in(ids, value_set=inter_ids).fill_null(-1).to_numpy()
    out = {fitted.user_id: ids.to_numpy(zero_copy_only=False)}
    out.update(id_columns(fitted.user, fitted.user_id, ids))
    row = pa.compute.index_in(ids, value_set=table_ids).fill_null(len(table_ids)).to_numpy()
    out.update({column_name(USER, n): a[row] for n, a in ctx.user_feats.items()})
    end = np.where(group >= 0, ends[np.maximum(group, 0)], 0)
    start = np.where(group >= 0, starts[np.maximum(group, 0)], 0)
    windows = {}
    for name, (L, _) in ctx.seq_specs.items():
        cols = end[:, None] - L + np.arange(L)[None, :]
        windows[name] = np.where(cols >= start[:, None], cols, -1)
    out.update(sequence_columns(ctx, windows))
    seen_offsets = np.r_[0, np.cumsum(end - start)].astype(np.int32)
    seen = np.concatenate([ctx.item_index[s:e] for s, e in zip(start, end, strict=True)] or [[]])
    table = to_arrow_table(out)
    return table.append_column(SEEN, pa.ListArray.from_arrays(
        pa.array(seen_offsets), pa.array(seen, pa.int64())))


def _all_histories(ctx: RowContext, inter: Interactions
                   ) -> tuple[pa.Array, np.ndarray, RowContext]:
    """The split users' interactions followed by the left-out users' ones.

    Returns:
        ``(user_id [N''], group_start [N''], ctx)``: the row context with ``item_index``
        and ``seq_ids`` extended to the same N'' positions.
    """
    rest = inter.dropped
    if rest is None:
        return inter.user_id, inter.split.group_start, ctx
    n = len(inter.split.group_start)
    seq_ids = {name: np.concatenate([ids, lookup(rest.item_id, ctx.user_tower.features[name]
                                                 .vocab_array())])
               for name, ids in ctx.seq_ids.items()}
    wider = replace(ctx, item_index=np.concatenate([ctx.item_index, rest.item_index]),
                    seq_ids=seq_ids)
    user_id = pa.concat_arrays([inter.user_id, rest.user_id.cast(inter.user_id.type)])
    return user_id, np.concatenate([inter.split.group_start, rest.group_start + n]), wider
