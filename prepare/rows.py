"""Building the encoded rows of the prepare step.

The user and item tables are encoded once (they are small next to the interactions);
each interaction row then gathers its user's and item's encoded features and its
history window (and, with ``loss.impressions_column``, its impressions: the catalogue rows
it was shown but did not click, [L] padded with -1). :func:`build_rows` is the pure batch
function Ray Data maps over row positions; the arrays it gathers from travel once through
the object store.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import pyarrow as pa

from pipeline import config as C
from pipeline.columns import (
    IMPRESSIONS,
    ITEM,
    ITEM_INDEX,
    ITEM_KEY,
    SEQUENCE_ITEMS,
    SEQUENCE_TIMES,
    SEQUENCE_WEIGHTS,
    TIMESTAMP,
    USER,
    USER_KEY,
    WEIGHT,
    column_name,
)
from pipeline.config import checks
from pipeline.errors import in_table
from pipeline.features import InputForm, spec_of
from pipeline.rows import (
    Columns,
    absent_row,
    encode_table,
    history_columns,
    id_columns,
    id_feature_names,
)
from pipeline.run_dir import SEQUENCES
from pipeline.splits import SPLIT_NAMES, trained_on
from pipeline.state import FeatureStateSet, TowerState
from pipeline.transforms import lookup
from prepare import split
from prepare.interactions import Impressions, Interactions


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
        if spec_of(st.type).form is InputForm.SEQUENCE:
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
            :func:`prepare.split.sequence_windows`; the last column is always real.
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
    :func:`pipeline.trained_on`, cut into windows of the window sequence's
    ``max_length + 1`` items per user, ends ``sequence.window_stride`` apart) when the user
    features resolve one (:func:`pipeline.config.checks.window_feature`).
    """
    parts: list[tuple[str, np.ndarray, RowBuild]] = [
        (name, inter.split.rows(code), build_rows) for code, name in SPLIT_NAMES.items()]
    sequence = checks.window_feature(
        cfg.sequence.feature, [f.name for f in cfg.features.user
                               if isinstance(f, C.SequenceFeature)])
    if sequence is not None:
        length = ctx.seq_specs[sequence][0] + 1
        windows = split.sequence_windows(inter.split.rows(trained_on(cfg.train.refit)),
                                         inter.split.group_start, length,
                                         cfg.sequence.window_stride)
        parts.append((SEQUENCES, windows, partial(build_sequence_rows, sequence=sequence)))
    return parts
