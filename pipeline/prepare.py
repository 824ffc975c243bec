"""The prepare step: validate -> read (Ray Data) -> split -> fit -> transform -> write.

This is pipeline's only Ray-facing module. Outputs under ``RUN_DIR/prepared/``:

- ``train/``, ``validation/``, ``test/``: one row per interaction with the raw keys,
  ``item_index`` (row in ``items.parquet``), every encoded user feature (``user__NAME``,
  the history sequence built from strictly earlier interactions) and every encoded item
  feature (``item__NAME``); with ``loss.impressions_column``, ``impressions`` [L]: the
  catalogue rows of the first ``loss.max_impressions`` known impression ids, -1 padded;
- ``sequences/``: the training split cut into windows per user (when the user features
  have one sequence feature, or ``sequence.feature`` names one): ``max_length + 1`` items
  each, oldest first and pre-padded, with the user's static features, the history columns
  over the window and each item's catalogue row, weight and timestamp (the sequence
  training mode);
- ``items.parquet``: the encoded catalogue, one row per item, in ``item_index`` order;
- ``users.parquet``: the encoded features and latest full history of every known user,
  plus ``seen_item_index`` (for serving: a known user id alone is enough);
- ``feature_state.json`` (vocabularies and statistics) and ``manifest.json``.

Everything is written to a temporary folder renamed at the end, so a failed run leaves
no partial ``prepared/``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline import data_checks, io, split
from pipeline.errors import TableError, in_table
from pipeline.features import spec_of
from pipeline.features.sequence import fit_history
from pipeline.rows import (
    Histories,
    Interactions,
    SplitWriter,
    build_context,
    impression_rows,
    write_local,
    write_splits,
    write_tables,
)
from pipeline.run_dir import (
    FEATURE_STATE,
    MANIFEST,
    PrepareManifest,
    RunDir,
    atomic_dir,
    write_json,
)
from pipeline.state import FeatureStateSet, TowerState

Log = Callable[[str], None]


def run_prepare(cfg: C.Config, run_dir: str | Path, log: Log = print,
                files: dict[str, io.TableFiles] | None = None, ray_data: bool = True
                ) -> PrepareManifest:
    """Run the whole prepare step; returns the manifest it wrote.

    Args:
        cfg: the experiment config.
        run_dir: RUN_DIR; ``prepared/`` is replaced only when every file is written.
        log: progress lines.
        files: the inputs :func:`validate_inputs` already checked (checked here if None).
        ray_data: read and write through Ray Data on the running Ray (the job); False runs
            the same steps in this process (the benchmark's baseline, small data).
    """
    t0 = time.perf_counter()
    files = files or validate_inputs(cfg)
    inputs = {t.name: t.paths for t in files.values()}
    run = RunDir(run_dir)
    try:
        users, items, raw = read_tables(files, cfg, log, ray_data=ray_data)
        with atomic_dir(run.prepared) as tmp:
            manifest = prepare_tables(cfg, users, items, raw, tmp,
                                      write_splits if ray_data else write_local, log, inputs, t0)
    except TableError as err:  # a bad value found in the data: name its file
        raise io.locate_error(err, files) from None
    log(f"[prepare] wrote {run.prepared} in {manifest.seconds}s: {manifest.rows}")
    return manifest


def in_process(cfg: C.Config, files: dict[str, io.TableFiles]) -> bool:
    """Whether prepare runs in this process: at most ``prepare.local_max_rows`` interactions.

    Ray Data pays seconds of fixed start-up per read and write (ML-100K: 9.8 s through Ray
    Data against 0.7 s in one process, README "Prepare throughput"); it is there to scale
    out past what one process holds.
    """
    return sum(files["interactions"].rows) <= cfg.prepare.local_max_rows


def prepare_tables(cfg: C.Config, users: pa.Table, items: pa.Table, raw: pa.Table,
                   out: Path, write: SplitWriter, log: Log,
                   inputs: dict[str, list[str]] | None = None,
                   started: float | None = None) -> PrepareManifest:
    """Split, fit, encode and write the prepared data of three read tables into ``out``.

    The one implementation of the step: the job passes the Ray Data split writer, the
    benchmark's single-process baseline the local one. Writes ``out/manifest.json`` with
    ``inputs`` (table -> files read) and the seconds since ``started`` (default: now).
    """
    t0 = time.perf_counter() if started is None else started
    inter = order_interactions(raw, items, cfg, log)
    stats = split.split_stats(inter.split, inter.timestamp)
    log(f"[prepare] data: {stats.describe()}, {items.num_rows:,} items")
    fitted = fit_state(cfg, inter, users, items)
    log(f"[prepare] fitted feature state {fitted.content_hash()} "
        f"({time.perf_counter() - t0:.1f}s)")
    ctx = build_context(cfg, fitted, inter, users, items)
    counts = write(ctx, inter, out, cfg, log)
    n_users = write_tables(ctx, inter, users, items, fitted, out)
    fitted.save(out / FEATURE_STATE)
    manifest = PrepareManifest(
        feature_state_hash=fitted.content_hash(), rows=counts, items=items.num_rows,
        users=n_users, interactions_read=raw.num_rows, inputs=dict(inputs or {}), config=cfg,
        seconds=round(time.perf_counter() - t0, 2), median_history=stats.median_history,
        tie_rate=stats.tie_rate)
    write_json(out / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def validate_inputs(cfg: C.Config) -> dict[str, io.TableFiles]:
    """Resolve and check the three tables' files from their footers; nothing is read yet.

    Raises:
        ValueError / FileNotFoundError: naming the file, the column and what is accepted:
            no Parquet file, an unreadable file, a missing or mistyped column, one column
            with two types across files, key columns of different kinds across tables, or
            an interactions or items table without rows.
    """
    needed = io.required_columns(cfg)
    files = {}
    for name in ("interactions", "users", "items"):
        tf = io.resolve_files(name, cfg.data.resolve(getattr(cfg.data, name)))
        if name == "interactions":
            tf = with_extra_interactions(tf, cfg.data)
        files[name] = io.validate_table(tf, needed[name])
    d = cfg.data
    io.check_empty(files["interactions"], f"interactions with columns {d.user_id!r}, "
                   f"{d.item_id!r}, {d.timestamp!r}, at least prepare.min_user_interactions="
                   f"{cfg.prepare.min_user_interactions} per user")
    io.check_empty(files["items"], f"a catalogue of at least one item, one row per "
                   f"{d.item_id!r}")
    for key, table in ((d.user_id, "users"), (d.item_id, "items")):
        _check_key_kinds(files["interactions"], files[table], key)
    return files


def with_extra_interactions(tf: io.TableFiles, d: C.DataConfig) -> io.TableFiles:
    """The interactions' files plus those of ``data.extra_interactions`` (the events log).

    The extra files are read as more interaction files (same columns and key types;
    ``manifest.json``'s inputs list them, so the run's user-state store never replays
    them). A folder that does not exist yet or holds no file adds nothing: a log that no
    event has reached.
    """
    if not d.extra_interactions:
        return tf
    uri = d.resolve(d.extra_interactions)
    if "://" not in uri and (not os.path.exists(uri) or (os.path.isdir(uri)
                                                         and not os.listdir(uri))):
        return tf
    extra = io.resolve_files("extra_interactions", uri)
    if type(extra.filesystem) is not type(tf.filesystem):
        raise ValueError(f"data.extra_interactions {uri!r} is on another filesystem than "
                         f"data.interactions {tf.uri!r}; accepted: both local or both on "
                         "one object store")
    return dataclasses.replace(tf, paths=[*tf.paths, *extra.paths])


def _check_key_kinds(inter: io.TableFiles, table: io.TableFiles, key: str) -> None:
    """Raise unless a key column is integer in both tables or string in both."""
    kinds = []
    for tf in (inter, table):
        schema = io.read_footer(tf, tf.paths[0]).schema.to_arrow_schema()
        kinds.append(io.key_kind(schema.field(key).type))
    if kinds[0] != kinds[1]:
        raise ValueError(
            f"{table.name} table, file {table.paths[0]}: column {key!r} holds {kinds[1]} keys "
            f"but the interactions table (file {inter.paths[0]}) holds {kinds[0]} keys; "
            f"accepted: {key!r} of one kind in every table (all integer or all string), cast "
            "one of them")


def read_tables(files: dict[str, io.TableFiles], cfg: C.Config, log: Log,
                ray_data: bool = True) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Read users, items and interactions (file order kept), checked, as Arrow tables.

    ``ray_data``: through Ray Data on the running Ray; otherwise pyarrow in this process.

    Raises:
        ValueError: naming the file a read failed on (a corrupt page behind a good footer).
        TableError: a bad value (null key or time, duplicate key, bad weight) at a row.
    """
    needed = io.required_columns(cfg)
    read = _read_ray if ray_data else _read_local
    out = []
    for name in ("users", "items", "interactions"):
        tf = files[name]
        columns = list(needed[name])
        try:
            table = read(tf, columns) if sum(tf.rows) else _empty_table(tf, columns)
        except (pa.ArrowException, OSError) as err:
            raise _read_error(tf, columns, err) from None
        log(f"[prepare] read {name}: {table.num_rows:,} rows from {len(tf.paths)} file(s)")
        out.append(checked_table(name, table.combine_chunks(), cfg))  # before the next read
    users, items, inter = out
    return users, items, inter


def _empty_table(tf: io.TableFiles, columns: list[str]) -> pa.Table:
    """A table whose files hold no row, with the columns of its first footer."""
    schema = io.read_footer(tf, tf.paths[0]).schema.to_arrow_schema()
    return schema.empty_table().select(columns)


def _read_error(tf: io.TableFiles, columns: list[str], err: Exception) -> Exception:
    """The file a failed read fails on, read alone here (the error path only)."""
    for path in tf.paths:
        try:
            pq.read_table(path, columns=columns, filesystem=tf.filesystem)
        except (pa.ArrowException, OSError) as file_err:
            return ValueError(f"{tf.name} table, file {path}: cannot be read "
                              f"({io.one_line(file_err)}); accepted: complete, uncorrupted "
                              f"Parquet files only under data.{tf.name} (rewrite this file "
                              "or move it away)")
    return err


# Ray Data logs a failed read task's whole traceback from these loggers before it raises;
# read_tables names the bad file itself (or re-raises, traceback and all), so they stay
# quiet during the read.
_RAY_DATA_ERROR_LOGGERS = ("ray.data.exceptions",
                           "ray.data._internal.execution.streaming_executor_state")


def _read_ray(tf: io.TableFiles, columns: list[str]) -> pa.Table:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # ties
    loggers = [logging.getLogger(name) for name in _RAY_DATA_ERROR_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        ds = ray.data.read_parquet(tf.paths, filesystem=tf.filesystem).select_columns(columns)
        return pa.concat_tables(ray.get(list(ds.to_arrow_refs())), promote_options="default")
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _read_local(tf: io.TableFiles, columns: list[str]) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(tf.paths, filesystem=tf.filesystem, format="parquet").to_table(
        columns=columns)


def checked_table(name: str, table: pa.Table, cfg: C.Config) -> pa.Table:
    """A read table, checked before the next table is read.

    Every table: UTF-8 strings. Users and items: unique non-null keys. Interactions:
    non-null times, valid weights.

    Raises:
        TableError: at the first bad row (the caller names its file).
    """
    d = cfg.data
    with in_table(name):
        data_checks.check_utf8(table)
        if name == "interactions":
            data_checks.check_no_null(table[d.timestamp], d.timestamp, "time",
                                      "integer unix time or a timestamp, never null (drop or "
                                      "fill those rows)")
            if d.weight:
                data_checks.check_weights(table[d.weight], d.weight)
        else:
            key = d.user_id if name == "users" else d.item_id
            data_checks.check_unique(table[key], key, name.rstrip("s"))
    return table


def order_interactions(raw: pa.Table, items: pa.Table, cfg: C.Config, log: Log) -> Interactions:
    """Drop interactions with unknown items or null keys, then split per user by time.

    Users with fewer than ``prepare.min_user_interactions`` interactions are left out of the
    splits; their interactions are kept aside (``Interactions.dropped``) for the serving
    table's history and seen items.

    Raises:
        TableError: no interaction is usable, no user has enough interactions, or the split
            leaves no training row.
    """
    d = cfg.data
    item_index = pc.index_in(raw[d.item_id], value_set=items[d.item_id]).to_numpy(
        zero_copy_only=False)
    known = ~np.isnan(item_index.astype(float))
    ok = known & ~raw[d.user_id].is_null().to_numpy(zero_copy_only=False)
    with in_table("interactions"):
        data_checks.check_usable(raw, items, known, ok, d)
    if (~ok).sum():
        log(f"[prepare] dropping {int((~ok).sum()):,} interactions with a null user or an "
            "item missing from the item table")
    rows = np.flatnonzero(ok)  # each usable interaction's row in the read table
    raw = raw.filter(pa.array(ok))
    item_index = np.asarray(item_index[ok], dtype=np.int64)
    ts = raw[d.timestamp]
    if pa.types.is_timestamp(ts.type):
        ts = pc.cast(ts, pa.int64())
    ts = ts.to_numpy().astype(np.int64)
    codes = pc.dictionary_encode(raw[d.user_id]).combine_chunks().indices.to_numpy()
    keep = usable_once(codes, item_index, ts, rows, raw[d.user_id], cfg, log)
    if not keep.all():
        raw, item_index, ts = raw.filter(pa.array(keep)), item_index[keep], ts[keep]
        codes = pc.dictionary_encode(raw[d.user_id]).combine_chunks().indices.to_numpy()
    sp = split.leave_last_out(codes, ts, cfg.prepare.min_user_interactions)
    with in_table("interactions"):
        data_checks.check_split(sp, np.bincount(codes), cfg, log)
    o = sp.order
    weight = (raw[d.weight].to_numpy().astype(np.float32)[o] if d.weight
              else np.ones(len(o), np.float32))
    imp_col = cfg.loss.impressions_column
    imp = impression_rows(raw[imp_col].take(o).combine_chunks(),
                          items[d.item_id].combine_chunks(), imp_col) if imp_col else None
    return Interactions(user_id=raw[d.user_id].take(o).combine_chunks(),
                        item_id=raw[d.item_id].take(o).combine_chunks(),
                        timestamp=ts[o], weight=weight, item_index=item_index[o], split=sp,
                        impressions=imp,
                        dropped=dropped_histories(raw, d, codes, ts, item_index, sp.order))


def usable_once(codes: np.ndarray, item_index: np.ndarray, ts: np.ndarray, rows: np.ndarray,
                user_ids: pa.ChunkedArray, cfg: C.Config, log: Log) -> np.ndarray:
    """[N] bool: the interactions kept after ``prepare.duplicates`` and the per-user cap.

    Exact duplicates (same user, item and time) are refused, dropped or kept; users holding
    a large share are named; ``prepare.max_user_interactions`` keeps each user's latest.

    Raises:
        TableError: a duplicate, with ``prepare.duplicates: error``.
    """
    keep = np.ones(len(codes), bool)
    with in_table("interactions"):
        repeated = data_checks.repeated_rows(codes, item_index, ts)
        data_checks.check_duplicates(repeated, rows, cfg, log)
    if cfg.prepare.duplicates is not C.Duplicates.KEEP:
        keep &= ~repeated
    data_checks.warn_dominant(codes[keep], user_ids.filter(pa.array(keep)), cfg, log)
    capped = np.zeros(len(codes), bool)
    capped[np.flatnonzero(keep)] = data_checks.capped_rows(
        codes[keep], ts[keep], cfg.prepare.max_user_interactions)
    if (keep & ~capped).any():
        log(f"[prepare] prepare.max_user_interactions={cfg.prepare.max_user_interactions}: "
            f"left out {int((keep & ~capped).sum()):,} older interactions of "
            f"{len(np.unique(codes[keep & ~capped])):,} user(s)")
    return capped


def dropped_histories(raw: pa.Table, d: C.DataConfig, codes: np.ndarray, ts: np.ndarray,
                      item_index: np.ndarray, kept: np.ndarray) -> Histories | None:
    """The interactions of users left out of the splits, sorted by (user, time, row).

    Args:
        raw: [N] usable interactions.
        d: the data section (key column names).
        codes: [N] user codes.
        ts: [N] int64 times.
        item_index: [N] catalogue rows.
        kept: the input rows the split kept (``Split.order``).

    Returns:
        None when every user was kept.
    """
    rest = np.ones(len(codes), bool)
    rest[kept] = False
    if not rest.any():
        return None
    rows = np.flatnonzero(rest)
    sp = split.leave_last_out(codes[rows], ts[rows], 1)
    o = pa.array(rows[sp.order])
    return Histories(user_id=raw[d.user_id].take(o).combine_chunks(),
                     item_id=raw[d.item_id].take(o).combine_chunks(),
                     item_index=item_index[rows[sp.order]], group_start=sp.group_start)


def fit_state(cfg: C.Config, inter: Interactions, users: pa.Table,
              items: pa.Table) -> FeatureStateSet:
    """Fit every feature: ids on training interactions, metadata on the tables."""
    train = inter.split.split == split.TRAIN
    train_users = inter.user_id.filter(pa.array(train))
    train_items = inter.item_id.filter(pa.array(train))
    d = cfg.data

    def fit_tower(feats: list, table: pa.Table, key: str, key_values: pa.Array) -> TowerState:
        fitted = {}
        for f in feats:
            spec = spec_of(f.type)
            if spec.table_column:  # sequences are fitted below, from the interactions
                col = key_values if f.source == key else table[f.source].combine_chunks()
                fitted[f.name] = spec.fit_column(f, col)
        return TowerState(fitted)

    with in_table("items"):
        item_tower = fit_tower(cfg.features.item, items, d.item_id, train_items)
    with in_table("users"):
        user_tower = fit_tower(cfg.features.user, users, d.user_id, train_users)
    feats = dict(user_tower.features)
    for f in cfg.features.user:
        if isinstance(f, C.SequenceFeature):
            feats[f.name] = fit_history(f, train_items, item_tower, d.item_id)
    ordered = {f.name: feats[f.name] for f in cfg.features.user}
    return FeatureStateSet(user=TowerState(ordered), item=item_tower,
                           user_id=d.user_id, item_id=d.item_id)


