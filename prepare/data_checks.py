"""Checks on the read tables: each raises a :class:`TableError` at the first bad row.

The prepare step reads the three tables as one Arrow table each (files in path order) and
calls these before it splits or fits anything; :func:`prepare.tables.locate_error` then names
the file and the row within it. Each message says what is wrong and what is accepted.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import config as C
from pipeline.errors import TableError
from pipeline.splits import TRAIN
from prepare import split

Log = Callable[[str], None]


def bad_weights(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """[N] bool, True where a weight is null, NaN, infinite or negative."""
    w = pc.cast(values, pa.float64())
    ok = pc.and_(pc.is_finite(w), pc.greater_equal(w, 0.0)).fill_null(False)
    return ~ok.to_numpy(zero_copy_only=False)


def check_weights(values: pa.ChunkedArray, column: str) -> None:
    """Raise at the first null, NaN, infinite or negative weight."""
    bad = np.flatnonzero(bad_weights(values))
    if len(bad):
        raise TableError(
            f"column {column!r} (data.weight) has {len(bad)} invalid weight(s), the first "
            f"{values[int(bad[0])].as_py()!r}; a weight must be a finite number >= 0 (no "
            "null, NaN, infinite or negative values)", row=int(bad[0]))


def _holds_text(typ: pa.DataType) -> bool:
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return True
    return (pa.types.is_list(typ) or pa.types.is_large_list(typ)) and \
        _holds_text(typ.value_type)


def check_utf8(table: pa.Table) -> None:
    """Raise at the first string that is not UTF-8 text, naming its column.

    Parquet stores strings as bytes and pyarrow reads them unchecked; a later step would
    fail on them with a bare ``UnicodeDecodeError`` that names no column or row.
    """
    for name in table.column_names:
        if not _holds_text(table.schema.field(name).type):
            continue
        row0 = 0
        for chunk in table[name].chunks:
            try:
                chunk.validate(full=True)
            except pa.ArrowInvalid:
                for i in range(len(chunk)):
                    try:
                        chunk[i].as_py()
                    except UnicodeDecodeError as err:
                        raise TableError(
                            f"column {name!r} holds bytes that are not UTF-8 text (this is "
                            f"the first: {err.object[max(err.start - 8, 0):err.end + 8]!r}); "
                            "accepted: UTF-8 strings (re-encode the column, e.g. from "
                            "latin-1, when writing the file)", row=row0 + i) from None
                raise
            row0 += len(chunk)


def check_no_null(values: pa.ChunkedArray, column: str, what: str, accepted: str) -> None:
    """Raise at the first null of a column every row needs."""
    if values.null_count:
        first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise TableError(f"column {column!r} has {values.null_count} null value(s) (this is "
                         f"the first); every row needs a {what}: {accepted}", row=first)


def check_unique(keys: pa.ChunkedArray, column: str, what: str) -> None:
    """Raise at the first null key, or at the first row of the first repeated key."""
    check_no_null(keys, column, "key", f"one non-null {what} id per row")
    counts = pc.value_counts(keys)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        value = dup[0]["values"]
        first = int(np.flatnonzero(pc.equal(keys, value).to_numpy(zero_copy_only=False))[0])
        raise TableError(f"column {column!r}: key {value.as_py()!r} appears "
                         f"{dup[0]['counts'].as_py()} times (this is the first); keys must be "
                         f"unique: one row per {what}", row=first)


def check_usable(raw: pa.Table, items: pa.Table, known: np.ndarray, ok: np.ndarray,
                 d: C.DataConfig) -> None:
    """Raise when no interaction has both a user and an item of the catalogue."""
    if ok.any():
        return
    unknown = raw[d.item_id].filter(pa.array(~known)).drop_null().unique()[:3].to_pylist()
    catalogue = items[d.item_id][:3].to_pylist()
    raise TableError(
        f"none of the {raw.num_rows:,} interactions can be used: "
        f"{raw[d.user_id].null_count:,} have a null {d.user_id!r} and {int((~known).sum()):,} "
        f"an {d.item_id!r} missing from the items table (e.g. {unknown}; the catalogue's "
        f"{d.item_id!r} are e.g. {catalogue}); accepted: interactions whose {d.item_id!r} is "
        f"a key of the items table and whose {d.user_id!r} is not null")


def check_split(sp: split.Split, per_user: np.ndarray, cfg: C.Config, log: Log) -> None:
    """Raise when the split keeps no user or no training row; warn about users without one.

    Args:
        sp: the split.
        per_user: [U] interactions of each user (before ``min_user_interactions``).
        cfg: the config (``prepare.min_user_interactions``, ``data.user_id``).
        log: where the warning goes.
    """
    k, col = cfg.prepare.min_user_interactions, cfg.data.user_id
    if not len(sp.order):
        raise TableError(
            f"column {col!r}: no user has prepare.min_user_interactions={k} interactions or "
            f"more (the most any of the {len(per_user):,} users has is {per_user.max()}); "
            f"accepted: at least one user with {k} or more; lower "
            f"prepare.min_user_interactions to {per_user.max()} or less, or add interactions")
    short = int(((per_user >= k) & (per_user < split.MIN_WITH_TRAINING)).sum())
    if not (sp.split == TRAIN).any():
        raise TableError(
            f"column {col!r}: no training rows: each of the {short:,} users kept has fewer "
            f"than {split.MIN_WITH_TRAINING} interactions, and leave-last-out puts a user's "
            "last interaction in test and the one before in validation; accepted: users "
            f"with {split.MIN_WITH_TRAINING} or more interactions; set "
            f"prepare.min_user_interactions: {split.MIN_WITH_TRAINING} (now {k})")
    if short:
        log(f"[prepare] warning: {short:,} of {int((per_user >= k).sum()):,} users kept have "
            f"fewer than {split.MIN_WITH_TRAINING} interactions "
            f"(prepare.min_user_interactions={k}): they get no training row, only "
            "validation / test targets with one or no item of history; set "
            f"prepare.min_user_interactions: {split.MIN_WITH_TRAINING} to leave them out")


# a user holding more than this share of the usable interactions, and more than MEDIAN_TIMES
# the median user's count, is named in a warning (a handful of users share any small table)
DOMINANT_SHARE, MEDIAN_TIMES = 0.1, 20


def repeated_rows(*keys: np.ndarray) -> np.ndarray:
    """[N] bool: rows equal on every key to an earlier row (each first occurrence False).

    Args:
        *keys: [N] arrays each, e.g. user codes, catalogue rows and times.
    """
    n = len(keys[0])
    order = np.lexsort((np.arange(n), *keys[::-1]))  # equal keys: earlier rows first
    same = np.ones(max(n - 1, 0), bool)
    for key in keys:
        sorted_key = key[order]
        same &= sorted_key[1:] == sorted_key[:-1]
    out = np.zeros(n, bool)
    out[order[1:][same]] = True
    return out


def check_duplicates(repeated: np.ndarray, rows: np.ndarray, cfg: C.Config, log: Log) -> None:
    """Refuse or announce exact duplicate interactions, by ``prepare.duplicates``.

    Args:
        repeated: [N] bool from :func:`repeated_rows` over the usable interactions.
        rows: [N] each usable interaction's row in the read table (for the error).
        cfg: the config (``prepare.duplicates``, key column names).
        log: where the warning goes.

    Raises:
        TableError: at the first repeat, when ``prepare.duplicates`` is ``error``.
    """
    n, mode, d = int(repeated.sum()), cfg.prepare.duplicates, cfg.data
    if not n or mode is C.Duplicates.KEEP:
        return
    what = (f"{n:,} interactions repeat an earlier row's {d.user_id!r}, {d.item_id!r} and "
            f"{d.timestamp!r} exactly (a file read twice, e.g. a backup copy in a subfolder "
            "of the table's folder?)")
    if mode is C.Duplicates.ERROR:
        raise TableError(f"{what}; this is the first repeat; accepted: each (user, item, "
                         "time) once, or set prepare.duplicates: drop (keep the first of "
                         "each) or keep", row=int(rows[np.flatnonzero(repeated)[0]]))
    log(f"[prepare] warning: dropping {what}; the first of each is kept "
        "(prepare.duplicates: drop; 'error' refuses such data, 'keep' trains on them)")


def capped_rows(codes: np.ndarray, ts: np.ndarray, cap: int | None) -> np.ndarray:
    """[N] bool: each user's latest ``cap`` interactions by time (all when ``cap`` is None).

    Ties in time keep the later row, as the split orders them.
    """
    keep = np.ones(len(codes), bool)
    if cap is None:
        return keep
    order = np.lexsort((np.arange(len(codes)), ts, codes))  # per user, oldest first
    sorted_codes = codes[order]
    start = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    end = np.r_[start[1:], len(order)]
    from_end = np.repeat(end, end - start) - np.arange(len(order))  # 1 = the user's newest
    keep[order[from_end > cap]] = False
    return keep


def warn_dominant(codes: np.ndarray, user_ids: pa.ChunkedArray, cfg: C.Config,
                  log: Log) -> None:
    """Name the users holding more than ``DOMINANT_SHARE`` of the interactions.

    Only users also above ``MEDIAN_TIMES`` times the median user's count: in a table of a
    few users, each holds a large share.

    Such a user fills the same share of the training rows and windows: the model learns
    mostly that user. ``prepare.max_user_interactions`` caps them.
    """
    per_user = np.bincount(codes)
    if len(per_user) < 2:
        return
    heavy = np.flatnonzero((per_user > DOMINANT_SHARE * len(codes))
                           & (per_user > MEDIAN_TIMES * np.median(per_user[per_user > 0])))
    if not len(heavy):
        return
    heavy = heavy[np.argsort(-per_user[heavy])][:5]
    named = ", ".join(f"{user_ids[int(np.argmax(codes == c))].as_py()!r} {per_user[c]:,} "
                      f"({per_user[c] / len(codes):.0%})" for c in heavy)
    cap = cfg.prepare.max_user_interactions
    log(f"[prepare] warning: users holding more than {DOMINANT_SHARE:.0%} of the "
        f"{len(codes):,} interactions, and so of the training rows and windows: {named}; "
        + ("set prepare.max_user_interactions to keep only each user's latest N"
           if cap is None else f"prepare.max_user_interactions={cap} kept their latest {cap}"))
