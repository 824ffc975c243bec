"""Reading the three tables: footer checks first, then Ray Data or one process.

:func:`validate_inputs` resolves each table's files and checks their Parquet footers
before any data is read; :func:`read_tables` reads the columns the config needs (Ray Data
for large inputs, pyarrow in-process for small ones) and :func:`checked_table` runs the
data checks that need the values, naming the file and row of the first bad one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline.errors import in_table
from prepare import data_checks, tables

Log = Callable[[str], None]


def validate_inputs(cfg: C.Config) -> dict[str, tables.TableFiles]:
    """Resolve and check the three tables' files from their footers; nothing is read yet.

    Raises:
        ValueError / FileNotFoundError: naming the file, the column and what is accepted:
            no Parquet file, an unreadable file, a missing or mistyped column, one column
            with two types across files, key columns of different kinds across tables, or
            an interactions or items table without rows.
    """
    needed = tables.required_columns(cfg)
    files = {}
    for name in ("interactions", "users", "items"):
        tf = tables.resolve_files(name, cfg.data.resolve(getattr(cfg.data, name)))
        if name == "interactions":
            tf = with_extra_interactions(tf, cfg.data)
        files[name] = tables.validate_table(tf, needed[name])
    d = cfg.data
    tables.check_empty(files["interactions"], f"interactions with columns {d.user_id!r}, "
                   f"{d.item_id!r}, {d.timestamp!r}, at least prepare.min_user_interactions="
                   f"{cfg.prepare.min_user_interactions} per user")
    tables.check_empty(files["items"], f"a catalogue of at least one item, one row per "
                   f"{d.item_id!r}")
    for key, table in ((d.user_id, "users"), (d.item_id, "items")):
        _check_key_kinds(files["interactions"], files[table], key)
    return files


def with_extra_interactions(tf: tables.TableFiles, d: C.DataConfig) -> tables.TableFiles:
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
    extra = tables.resolve_files("extra_interactions", uri)
    if type(extra.filesystem) is not type(tf.filesystem):
        raise ValueError(f"data.extra_interactions {uri!r} is on another filesystem than "
                         f"data.interactions {tf.uri!r}; accepted: both local or both on "
                         "one object store")
    return dataclasses.replace(tf, paths=[*tf.paths, *extra.paths])


def _check_key_kinds(inter: tables.TableFiles, table: tables.TableFiles, key: str) -> None:
    """Raise unless a key column is integer in both tables or string in both."""
    kinds = []
    for tf in (inter, table):
        schema = tables.read_footer(tf, tf.paths[0]).schema.to_arrow_schema()
        kinds.append(tables.key_kind(schema.field(key).type))
    if kinds[0] != kinds[1]:
        raise ValueError(
            f"{table.name} table, file {table.paths[0]}: column {key!r} holds {kinds[1]} keys "
            f"but the interactions table (file {inter.paths[0]}) holds {kinds[0]} keys; "
            f"accepted: {key!r} of one kind in every table (all integer or all string), cast "
            "one of them")


def read_tables(files: dict[str, tables.TableFiles], cfg: C.Config, log: Log,
                ray_data: bool = True) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Read users, items and interactions (file order kept), checked, as Arrow tables.

    ``ray_data``: through Ray Data on the running Ray; otherwise pyarrow in this process.

    Raises:
        ValueError: naming the file a read failed on (a corrupt page behind a good footer).
        TableError: a bad value (null key or time, duplicate key, bad weight) at a row.
    """
    needed = tables.required_columns(cfg)
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


def _empty_table(tf: tables.TableFiles, columns: list[str]) -> pa.Table:
    """A table whose files hold no row, with the columns of its first footer."""
    schema = tables.read_footer(tf, tf.paths[0]).schema.to_arrow_schema()
    return schema.empty_table().select(columns)


def _read_error(tf: tables.TableFiles, columns: list[str], err: Exception) -> Exception:
    """The file a failed read fails on, read alone here (the error path only)."""
    for path in tf.paths:
        try:
            pq.read_table(path, columns=columns, filesystem=tf.filesystem)
        except (pa.ArrowException, OSError) as file_err:
            return ValueError(f"{tf.name} table, file {path}: cannot be read "
                              f"({tables.one_line(file_err)}); accepted: complete, uncorrupted "
                              f"Parquet files only under data.{tf.name} (rewrite this file "
                              "or move it away)")
    return err


# Ray Data logs a failed read task's whole traceback from these loggers before it raises;
# read_tables names the bad file itself (or re-raises, traceback and all), so they stay
# quiet during the read.
_RAY_DATA_ERROR_LOGGERS = ("ray.data.exceptions",
                           "ray.data._internal.execution.streaming_executor_state")


def _read_ray(tf: tables.TableFiles, columns: list[str]) -> pa.Table:
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


def _read_local(tf: tables.TableFiles, columns: list[str]) -> pa.Table:
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
