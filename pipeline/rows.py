"""Building the encoded rows of the prepare step.

The user and item tables are encoded once (they are small next to the interactions);
each interaction row then gathers its user's and item's encoded features and its
history window. :func:`build_rows` is the pure batch function Ray Data maps over row
positions; the arrays it gathers from travel once through the object store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline import io, split
from pipeline.columns import (
    ITEM,
    ITEM_INDEX,
    ITEM_KEY,
    SEEN,
    TIMESTAMP,
    USER,
    USER_KEY,
    WEIGHT,
    column_name,
)
from pipeline.run_dir import TABLES
from pipeline.state import FeatureStateSet
from pipeline.transforms import encode_feature, lookup, transform_tower


@dataclass
class Interactions:
    """Interactions sorted by (user, time, input row), restricted to catalogue items."""

    user_id: pa.Array
    item_id: pa.Array
    timestamp: np.ndarray
    weight: np.ndarray
    item_index: np.ndarray  # [N'] catalogue row of each interaction
    split: split.Split


@dataclass
class RowContext:
    """Arrays an interaction row is assembled from (all indexed by sorted position)."""

    user_id: np.ndarray  # [N'] raw ids
    item_id: np.ndarray  # [N']
    timestamp: np.ndarray  # [N']
    weight: np.ndarray  # [N']
    item_index: np.ndarray  # [N'] catalogue row
    user_row: np.ndarray  # [N'] row in user_feats (last row: user absent from the table)
    group_start: np.ndarray  # [N']
    user_id_feats: dict[str, np.ndarray]  # id features, [N'] per feature
    user_feats: dict[str, np.ndarray]  # [U + 1, ...] encoded user-table features
    item_feats: dict[str, np.ndarray]  # [I, ...] encoded catalogue features
    seq_ids: dict[str, np.ndarray]  # [N'] history vocabulary id of each sorted item
    seq_specs: dict[str, tuple[int, list[str]]]  # name -> (max_length, item features)


def _encode_table(table: pa.Table, tower, skip: list[str]) -> dict[str, np.ndarray]:
    """Encode a table plus one all-null row at the end (the "absent" row)."""
    nulls = pa.table({c: pa.nulls(1, table.schema.field(c).type) for c in table.column_names})
    full = pa.concat_tables([table, nulls])
    return transform_tower({c: full[c] for c in full.column_names}, tower, skip=skip)


def build_context(cfg: C.Config, fitted: FeatureStateSet, inter: Interactions,
                  users: pa.Table, items: pa.Table) -> RowContext:
    """Encode the tables and the per-interaction id / history columns."""
    d = cfg.data
    id_names = [n for n, s in fitted.user.features.items()
                if s.type == "categorical" and s.source == d.user_id]
    user_feats = _encode_table(users, fitted.user, skip=id_names)
    item_feats = {k: v[:-1] for k, v in _encode_table(items, fitted.item, []).items()}
    pos = pa.compute.index_in(inter.user_id, value_set=users[d.user_id]).fill_null(len(users))
    id_feats: dict[str, np.ndarray] = {}
    for n in id_names:
        id_feats.update(encode_feature(inter.user_id, fitted.user.features[n], n))
    seq_ids, specs = {}, {}
    for name, st in fitted.user.features.items():
        if st.type == "sequence":
            seq_ids[name] = lookup(inter.item_id, st.vocab_array())
            specs[name] = (st.max_length, st.item_features)
    return RowContext(
        user_id=inter.user_id.to_numpy(zero_copy_only=False),
        item_id=inter.item_id.to_numpy(zero_copy_only=False),
        timestamp=inter.timestamp, weight=inter.weight, item_index=inter.item_index,
        user_row=pos.to_numpy().astype(np.int64), group_start=inter.split.group_start,
        user_id_feats=id_feats, user_feats=user_feats, item_feats=item_feats,
        seq_ids=seq_ids, seq_specs=specs)


def sequence_columns(ctx: RowContext, windows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """History columns from [B, L] windows of sorted positions (-1 = padding)."""
    out = {}
    for name, (_, item_features) in ctx.seq_specs.items():
        win = windows[name]
        valid = win >= 0
        safe = np.where(valid, win, 0)
        out[column_name(USER, name)] = np.where(valid, ctx.seq_ids[name][safe], 0)
        for f in item_features:
            vals = ctx.item_feats[f][ctx.item_index[safe]]
            out[column_name(USER, name, f)] = np.where(valid, vals, 0)
    return out


def build_rows(positions: np.ndarray, ctx: RowContext) -> dict[str, np.ndarray]:
    """Assemble encoded rows for sorted positions ``[B]`` (pure; Ray Data's batch fn)."""
    p = positions
    out = {USER_KEY: ctx.user_id[p], ITEM_KEY: ctx.item_id[p], TIMESTAMP: ctx.timestamp[p],
           WEIGHT: ctx.weight[p], ITEM_INDEX: ctx.item_index[p]}
    for name, arr in ctx.user_id_feats.items():
        out[column_name(USER, name)] = arr[p]
    urow = ctx.user_row[p]
    for name, arr in ctx.user_feats.items():
        out[column_name(USER, name)] = arr[urow]
    windows = {n: split.history_windows(p, ctx.group_start, L)
               for n, (L, _) in ctx.seq_specs.items()}
    out.update(sequence_columns(ctx, windows))
    irow = ctx.item_index[p]
    for name, arr in ctx.item_feats.items():
        out[column_name(ITEM, name)] = arr[irow]
    return out


SplitWriter = Callable[["RowContext", "Interactions", Path, C.Config, Callable[[str], None]],
                       dict[str, int]]  # writes train / validation / test, returns row counts


class _RowBuilder:
    """Ray Data batch function: fetches the context once per worker, then gathers."""

    def __init__(self, ctx_ref, rows_ref):
        self._refs = (ctx_ref, rows_ref)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import ray

        ctx, rows = ray.get(list(self._refs))
        return io.to_arrow_table(build_rows(rows[batch["id"]], ctx))


def write_splits(ctx: RowContext, inter: Interactions, out: Path, cfg: C.Config,
                 log) -> dict[str, int]:
    """Write train / validation / test Parquet through Ray Data; returns row counts."""
    import ray

    ctx_ref = ray.put(ctx)
    counts = {}
    for code, name in split.SPLIT_NAMES.items():
        rows = inter.split.rows(code)
        counts[name] = int(len(rows))
        blocks = max(1, -(-len(rows) // cfg.prepare.rows_per_file))
        ds = ray.data.range(len(rows), override_num_blocks=blocks).map_batches(
            _RowBuilder(ctx_ref, ray.put(rows)), batch_format="numpy",
            batch_size=min(cfg.prepare.rows_per_file, 200_000), num_cpus=cfg.prepare.num_cpus)
        ds.write_parquet(str(out / name), min_rows_per_file=cfg.prepare.rows_per_file)
        log(f"[prepare] wrote {name}: {len(rows):,} rows")
    return counts


def write_local(ctx: RowContext, inter: Interactions, out: Path, cfg: C.Config,
                log) -> dict[str, int]:
    """Write the splits in this process (no Ray): the same rows, file by file."""
    counts = {}
    step = cfg.prepare.rows_per_file
    for code, name in split.SPLIT_NAMES.items():
        rows = inter.split.rows(code)
        counts[name] = int(len(rows))
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(0, max(1, len(rows)), step):
            table = io.to_arrow_table(build_rows(rows[i:i + step], ctx))
            pq.write_table(table, out / name / f"part-{i // step:05d}.parquet")
        log(f"[prepare] wrote {name}: {len(rows):,} rows")
    return counts


def write_tables(ctx: RowContext, inter: Interactions, users: pa.Table, items: pa.Table,
                 fitted: FeatureStateSet, out: Path) -> int:
    """Write the encoded catalogue and the per-user serving table; returns the user count."""
    cat = {fitted.item_id: items[fitted.item_id].to_numpy(zero_copy_only=False)}
    cat.update({column_name(ITEM, n): a for n, a in ctx.item_feats.items()})
    pq.write_table(io.to_arrow_table(cat), out / TABLES[ITEM])
    table = user_table(ctx, inter, users, fitted)
    pq.write_table(table, out / TABLES[USER])
    return table.num_rows


def user_table(ctx: RowContext, inter: Interactions, users: pa.Table,
               fitted: FeatureStateSet) -> pa.Table:
    """Every known user: encoded features, latest history, and all seen catalogue rows."""
    sp = inter.split
    starts = np.flatnonzero(np.r_[True, sp.group_start[1:] != sp.group_start[:-1]]) \
        if len(sp.group_start) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(sp.group_start)].astype(np.int64)
    inter_ids = inter.user_id.take(pa.array(starts))
    table_ids = users[fitted.user_id].combine_chunks()
    extra = inter_ids.filter(pa.compute.invert(pa.compute.is_in(inter_ids, value_set=table_ids)))
    ids = pa.concat_arrays([table_ids.cast(inter_ids.type), extra]) if len(extra) else table_ids
    group = pa.compute.index_in(ids, value_set=inter_ids).fill_null(-1).to_numpy()
    out = {fitted.user_id: ids.to_numpy(zero_copy_only=False)}
    for name, st in fitted.user.features.items():
        if st.type == "categorical" and st.source == fitted.user_id:
            out.update({column_name(USER, k): v
                        for k, v in encode_feature(ids, st, name).items()})
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
    table = io.to_arrow_table(out)
    return table.append_column(SEEN, pa.ListArray.from_arrays(
        pa.array(seen_offsets), pa.array(seen, pa.int64())))
