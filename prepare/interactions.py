"""The interactions record of the prepare step, and where it is built.

:func:`order_interactions` sorts the read interactions by (user, time, input row), keeps
catalogue items, splits them (leave last out) and gathers each row's impressions: the
:class:`Interactions` every later stage (fit, rows, writers) reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import config as C
from pipeline.errors import TableError, in_table
from prepare import data_checks, split, tables

Log = Callable[[str], None]


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
                         f"{catalogue_keys.type} ({tables.one_line(err)}); accepted: item ids "
                         "of the items table's key type", table="interactions") from err
    index = pc.index_in(flat, value_set=catalogue_keys)  # null: not in the catalogue
    known = index.is_valid().to_numpy(zero_copy_only=False)
    parent = np.repeat(np.arange(len(lengths)), lengths)  # [K'] interaction of each id
    counts = np.bincount(parent[known], minlength=len(lengths))
    rows = index.filter(pa.array(known)).to_numpy(zero_copy_only=False).astype(np.int64)
    return Impressions(offsets=np.r_[0, np.cumsum(counts)].astype(np.int64), rows=rows)
