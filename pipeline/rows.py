"""Building the encoded rows of the prepare step.

The user and item tables are encoded once (they are small next to the interactions);
each interaction row then gathers its user's and item's encoded features and its
history window (and, with ``loss.impressions_column``, its impressions: the catalogue rows
it was shown but did not click, [L] padded with -1). :func:`build_rows` is the pure batch
function Ray Data maps over row positions; the arrays it gathers from travel once through
the object store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline import io, split
from pipeline.columns import (
    IMPRESSIONS,
    ITEM,
    ITEM_INDEX,
    ITEM_KEY,
    SEEN,
    SEQUENCE_ITEMS,
    SEQUENCE_TIMES,
    SEQUENCE_WEIGHTS,
    TIMESTAMP,
    USER,
    USER_KEY,
    WEIGHT,
    column_name,
    prefixed,
)
from pipeline.config import checks
from pipeline.errors import TableError, in_table
from pipeline.features import encode_feature, spec_of, transform_tower
from pipeline.run_dir import SEQUENCES, TABLES
from pipeline.state import FeatureKind, FeatureStateSet, TowerState
from pipeline.transforms import lookup


@dataclass
class Impressions:
    """Each interaction's impressions as catalogue rows, ragged (row i: ``rows[o[i]:o[i+1]]``)."""

    offsets: np.ndarray  # [N' + 1] int64, o above
    rows: np.ndarray  # [K] int64 catalogue rows, in list order


@dataclass
class Histories:
    """Interactions of the users left out of the splits, sorted by (user, time, input row).

    A user with fewer than ``prepare.min_user_interactions`` interactions gets no training,
    validation or test row, but serving still needs what they consumed (history, seen set).
    """

    user_id: pa.Array  # [D]
    item_id: pa.Array  # [D]
    item_index: np.ndarray  # [D] catalogue rows
    group_start: np.ndarray  # [D] position of the user's first row


@dataclass
class Interactions:
    """Interactions sorted by (user, time, input row), restricted to catalogue items."""

    user_id: pa.Array
    item_id: pa.Array
    timestamp: np.ndarray
    weight: np.ndarray
    item_index: np.ndarray  # [N'] catalogue row of each interaction
    split: split.Split
    impressions: Impressions | None = None  # with loss.impressions_column
    dropped: Histories | None = None  # users below prepare.min_user_interactions


Columns = dict[str, np.ndarray]  # column or input key -> [N, ...]


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
    user_tower: TowerState  # the user tower's fitted state
    user_id_feats: dict[str, np.ndarray]  # id feature columns (user__NAME), [N'] each
    user_feats: dict[str, np.ndarray]  # [U + 1, ...] encoded user-table features
    item_feats: dict[str, np.ndarray]  # [I, ...] encoded catalogue features
    seq_ids: dict[str, np.ndarray]  # [N'] history vocabulary id of each sorted item
    seq_specs: dict[str, tuple[int, list[str]]]  # name -> (max_length, item features)
    impressions: Impressions | None = None  # sorted positions' impressions
    max_impressions: int = 0  # L of the written [L] impressions column


def encode_table(table: pa.Table, tower: TowerState, skip: Sequence[str] = ()) -> Columns:
    """Encode every table-backed feature of a tower: ``{name: [N, ...]}`` (no prefix)."""
    return transform_tower({c: table[c] for c in table.column_names}, tower, skip=skip)


def absent_row(tower: TowerState, skip: Sequence[str] = ()) -> Columns:
    """The encoded row of a key absent from its table: every feature null, ``[1, ...]``.

    Prepare appends it to the encoded user table (users seen only in interactions), and
    serving starts an unknown user from it: one function, two callers.
    """
    out: Columns = {}
    for name, st in tower.features.items():
        if spec_of(st.type).table_column and name not in skip:
            out.update(encode_feature(spec_of(st.type).null_array(st), st, name))
    return out


def id_feature_names(tower: TowerState, key: str) -> list[str]:
    """The tower's id features: categorical features read from its key column."""
    return checks.id_features(((n, s.type, s.source) for n, s in tower.features.items()), key)


def id_columns(tower: TowerState, key: str, ids: pa.Array) -> Columns:
    """The id features of ``ids`` [N] raw keys, as prepared columns (``user__NAME``)."""
    out: Columns = {}
    for name in id_feature_names(tower, key):
        out.update(prefixed(USER, encode_feature(ids, tower.features[name], name)))
    return out


def history_columns(tower: TowerState, ids: Mapping[str, np.ndarray],
                    rows: Mapping[str, np.ndarray], item_feats: Mapping[str, np.ndarray]
                    ) -> Columns:
    """Every history column of a user tower from laid-out histories.

    Args:
        tower: the user tower's fitted state.
        ids: sequence name -> [B, L] history vocabulary ids (0 = padding), for each sequence
            to lay out (every sequence of the tower, or the one training windows are cut
            from).
        rows: sequence name -> [B, L] catalogue row of each position (-1 = padding or an
            unknown item).
        item_feats: item feature name -> [I] its encoded catalogue column.

    Returns:
        ``user__SEQ`` and ``user__SEQ__FEATURE`` -> [B, L] int64 (0 where ``rows`` is -1).
    """
    out: Columns = {}
    for name in ids:
        st = tower.features[name]
        at = rows[name]
        out[column_name(USER, name)] = ids[name]
        for f in st.item_features:
            out[column_name(USER, name, f)] = np.where(at >= 0, item_feats[f][np.maximum(at, 0)],
                                                       0)
    return out


def build_context(cfg: C.Config, fitted: FeatureStateSet, inter: Interactions,
                  users: pa.Table, items: pa.Table) -> RowContext:
    """Encode the tables and the per-interaction id / history columns."""
    d = cfg.data
    id_names = id_feature_names(fitted.user, d.user_id)
    with in_table("users"):
        encoded = encode_table(users, fitted.user, skip=id_names)
    absent = absent_row(fitted.user, skip=id_names)  # the last row: users not in the table
    user_feats = {k: np.concatenate([v, absent[k]]) for k, v in encoded.items()}
    with in_table("items"):
        item_feats = encode_table(items, fitted.item)
    pos = pa.compute.index_in(inter.user_id, value_set=users[d.user_id]).fill_null(len(users))
    id_feats = id_columns(fitted.user, d.user_id, inter.user_id)
    seq_ids, specs = {}, {}
    for name, st in fitted.user.features.items():
        if st.type is FeatureKind.SEQUENCE:
            seq_ids[name] = lookup(inter.item_id, st.vocab_array())
            specs[name] = (st.max_length, st.item_features)
    return RowContext(
        user_id=inter.user_id.to_numpy(zero_copy_only=False),
        item_id=inter.item_id.to_numpy(zero_copy_only=False),
        timestamp=inter.timestamp, weight=inter.weight, item_index=inter.item_index,
        user_row=pos.to_numpy().astype(np.int64), group_start=inter.split.group_start,
        user_tower=fitted.user, user_id_feats=id_feats, user_feats=user_feats,
        item_feats=item_feats,
        seq_ids=seq_ids, seq_specs=specs, impressions=inter.impressions,
        max_impressions=cfg.loss.max_impressions)


def impression_rows(lists: pa.Array, catalogue_keys: pa.Array, column: str) -> Impressions:
    """Map each interaction's list of item ids to catalogue rows; unknown and null ids dropped.

    Args:
        lists: [N] list<int | string> column of item ids (a null list: no impressions).
        catalogue_keys: [I] the item table's keys, in catalogue order.
        column: the column's name, for the error message.

    Raises:
        TableError: naming the column when its ids cannot be compared with the item keys.
    """
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False)
    try:
        flat = pc.cast(pc.list_flatten(lists), catalogue_keys.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise TableError(f"column {column!r} (loss.impressions_column) holds ids of type "
                         f"{lists.type.value_type} that do not convert to the item key type "
                         f"{catalogue_keys.type} ({io.one_line(err)}); accepted: item ids of the "
                         "items table's key type", table="interactions") from err
    index = pc.index_in(flat, value_set=catalogue_keys)  # null: not in the catalogue
    known = index.is_valid().to_numpy(zero_copy_only=False)
    parent = np.repeat(np.arange(len(lengths)), lengths)  # [K'] interaction of each id
    counts = np.bincount(parent[known], minlength=len(lengths))
    rows = index.filter(pa.array(known)).to_numpy(zero_copy_only=False).astype(np.int64)
    return Impressions(offsets=np.r_[0, np.cumsum(counts)].astype(np.int64), rows=rows)


def impression_matrix(positions: np.ndarray, imp: Impressions, width: int) -> np.ndarray:
    """[B, width] int64 catalogue rows of the first ``width`` impressions, -1 padded."""
    start = imp.offsets[positions]
    count = np.minimum(imp.offsets[positions + 1] - start, width)  # [B]
    cols = np.arange(width)
    valid = cols[None, :] < count[:, None]  # [B, width]
    if not len(imp.rows):
        return np.full(valid.shape, -1, np.int64)
    take = np.where(valid, start[:, None] + cols[None, :], 0)
    return np.where(valid, imp.rows[take], -1).astype(np.int64)


def sequence_columns(ctx: RowContext, windows: Mapping[str, np.ndarray]) -> Columns:
    """History columns from [B, L] windows of sorted positions (-1 = padding) per sequence."""
    ids, rows = {}, {}
    for name, win in windows.items():
        safe = np.where(win >= 0, win, 0)
        ids[name] = np.where(win >= 0, ctx.seq_ids[name][safe], 0)
        rows[name] = np.where(win >= 0, ctx.item_index[safe], -1)
    return history_columns(ctx.user_tower, ids, rows, ctx.item_feats)


def build_rows(positions: np.ndarray, ctx: RowContext) -> dict[str, np.ndarray]:
    """Assemble encoded rows for sorted positions ``[B]`` (pure; Ray Data's batch fn)."""
    p = positions
    out = {USER_KEY: ctx.user_id[p], ITEM_KEY: ctx.item_id[p], TIMESTAMP: ctx.timestamp[p],
           WEIGHT: ctx.weight[p], ITEM_INDEX: ctx.item_index[p]}
    for column, arr in ctx.user_id_feats.items():
        out[column] = arr[p]
    urow = ctx.user_row[p]
    for name, arr in ctx.user_feats.items():
        out[column_name(USER, name)] = arr[urow]
    windows = {n: split.history_windows(p, ctx.group_start, L)
               for n, (L, _) in ctx.seq_specs.items()}
    out.update(sequence_columns(ctx, windows))
    irow = ctx.item_index[p]
    for name, arr in ctx.item_feats.items():
        out[column_name(ITEM, name)] = arr[irow]
    if ctx.impressions is not None:
        out[IMPRESSIONS] = impression_matrix(p, ctx.impressions, ctx.max_impressions)
    return out


def build_sequence_rows(windows: np.ndarray, ctx: RowContext, sequence: str
                        ) -> dict[str, np.ndarray]:
    """Assemble training windows (pure; Ray Data's batch fn for ``prepared/sequences/``).

    Args:
        windows: [W, L + 1] sorted positions of each window (-1 = padding), from
            :func:`pipeline.split.sequence_windows`; the last column is always real.
        ctx: the row context.
        sequence: the user sequence feature the windows are laid out as.

    Returns:
        The user's key and static features (as of the window's newest item), the history
        columns of ``sequence`` over the whole window (``user__SEQ``, ``user__SEQ__F``:
        [W, L + 1]), :data:`SEQUENCE_ITEMS` (catalogue rows, -1 = padding),
        :data:`SEQUENCE_WEIGHTS` (``data.weight`` of each item, 0 at padding) and
        :data:`SEQUENCE_TIMES` (each item's timestamp, the int64 minimum at padding).
    """
    newest = windows[:, -1]
    out = {USER_KEY: ctx.user_id[newest]}
    for column, arr in ctx.user_id_feats.items():
        out[column] = arr[newest]
    urow = ctx.user_row[newest]
    for name, arr in ctx.user_feats.items():
        out[column_name(USER, name)] = arr[urow]
    out.update(sequence_columns(ctx, {sequence: windows}))
    real, safe = windows >= 0, np.maximum(windows, 0)
    out[SEQUENCE_ITEMS] = np.where(real, ctx.item_index[safe], -1).astype(np.int64)
    out[SEQUENCE_WEIGHTS] = np.where(real, ctx.weight[safe], 0).astype(np.float32)
    out[SEQUENCE_TIMES] = np.where(real, ctx.timestamp[safe],
                                   np.iinfo(np.int64).min).astype(np.int64)
    return out


RowBuild = Callable[[np.ndarray, "RowContext"], dict[str, np.ndarray]]


def outputs(ctx: RowContext, inter: Interactions, cfg: C.Config
            ) -> list[tuple[str, np.ndarray, RowBuild]]:
    """What prepare writes per folder: ``(name, rows to build, build function)``.

    The three splits (one row per interaction), and ``sequences`` (the trained splits,
    :func:`pipeline.split.trained_on`, cut into windows of the window sequence's
    ``max_length + 1`` items per user, ends ``sequence.window_stride`` apart) when the user
    features resolve one (:func:`pipeline.config.checks.window_feature`).
    """
    parts: list[tuple[str, np.ndarray, RowBuild]] = [
        (name, inter.split.rows(code), build_rows) for code, name in split.SPLIT_NAMES.items()]
    sequence = checks.window_feature(
        cfg.sequence.feature, [f.name for f in cfg.features.user
                               if isinstance(f, C.SequenceFeature)])
    if sequence is not None:
        length = ctx.seq_specs[sequence][0] + 1
        windows = split.sequence_windows(inter.split.rows(split.trained_on(cfg.train.refit)),
                                         inter.split.group_start, length,
                                         cfg.sequence.window_stride)
        parts.append((SEQUENCES, windows, partial(build_sequence_rows, sequence=sequence)))
    return parts


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
        return io.to_arrow_table(self._build(rows[batch["id"]], ctx))


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
            table = io.to_arrow_table(build(rows[i:i + step], ctx))
            pq.write_table(table, out / name / f"part-{i // step:05d}.parquet")
        log(f"[prepare] wrote {name}: {len(rows):,} rows ({time.perf_counter() - start:.1f}s)")
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
    table = io.to_arrow_table(out)
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
