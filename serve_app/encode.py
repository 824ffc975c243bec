"""Request -> user-tower columns, encoded exactly as the prepare step encodes a row.

A request's user part is assembled in three layers, each with ``pipeline.transforms``:

1. the base row: a known user's stored row of ``prepared/users.parquet`` (features,
   latest history and item features of the history), or for an unknown / absent user
   the all-null row prepare gives users missing from the user table, with the id feature
   encoded from the request's id (unseen -> out-of-vocabulary, none -> padding);
2. ``features``: raw values by source column, each through ``encode_feature`` with the
   fitted state, overriding the base row;
3. ``history``: raw item ids through ``encode_sequence`` with the sequence vocabulary,
   after dropping ids that are not in the catalogue (prepare drops such interactions);
   the history's item features are the encoded catalogue's values of those items, laid
   out with the same pre-padding.

Every vocabulary lookup goes through the fitted state's cached
:class:`~pipeline.transforms.VocabIndex` (one dict per vocabulary, built on first use), so
no request hashes a vocabulary again.

Columns are named as in the prepared Parquet (``user__NAME``) so the training helpers
(``tower_inputs``) apply unchanged. No torch and no Serve here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.columns import ITEM, SEEN, USER, column_name, prefixed, tower_columns
from pipeline.io import column_to_numpy
from pipeline.rows import absent_row, history_columns, id_columns, id_feature_names
from pipeline.state import RESERVED, FeatureKind, FeatureState, FeatureStateSet
from pipeline.transforms import (
    VocabIndex,
    as_arrow,
    distinct,
    encode_feature,
    encode_sequence,
    pad_bags,
)
from serve_app.schemas import FeatureValue, RawId, RequestError, UnknownItemError

Columns = dict[str, np.ndarray]  # "user__NAME" -> [1, ...] (one request) or [B, ...]


@dataclass(frozen=True)
class EncodedUser:
    """One request's user-tower columns and the catalogue rows it has already seen.

    Attributes:
        columns: ``user__NAME`` -> [1, ...] arrays, as in ``prepared/users.parquet``.
        seen: [S] int64 distinct catalogue rows: stored seen items plus the request's
            history.
        stored_row: the user's row in ``prepared/users.parquet`` when the request is that
            row exactly (a known id, no ``features``, no ``history``), else -1: its
            embedding is then the one the index build wrote for the row.
    """

    columns: Columns
    seen: np.ndarray
    stored_row: int = -1  # users.parquet row of a known user sent without overrides


def null_array(state: FeatureState) -> pa.Array:
    """A one-row null of the raw type a feature is encoded from (its kind's registry entry)."""
    return state.spec.null_array(state)


def raw_array(value: FeatureValue, state: FeatureState) -> pa.Array:
    """One raw JSON value as the one-row Arrow array its feature kind is encoded from.

    Raises:
        TypeError / ValueError / pyarrow.ArrowException: the value does not fit the kind.
    """
    return state.spec.raw_array(value, state)


class IdMap:
    """Raw key -> table row, through a :class:`~pipeline.transforms.VocabIndex` built once.

    Keys compare by the one rule every lookup uses (``pipeline.transforms.cast_like``):
    "7" finds the integer key 7, " 7" or full-width digits do not, and a value that cannot
    be cast is unknown.

    Args:
        keys: [N] unique integer or string keys; row i holds key i.
    """

    def __init__(self, keys: pa.Array | pa.ChunkedArray):
        self.index = VocabIndex(keys)

    def __len__(self) -> int:
        return len(self.index)

    def row(self, value: RawId) -> int:
        """The row of one value (-1 where it is not a key)."""
        found = self.index.lookup_one(value)  # vocab index: row + 2
        return found - RESERVED if found >= RESERVED else -1

    def rows(self, values: list[RawId]) -> np.ndarray:
        """[N] int64 rows of ``values`` (-1 where a value is not a key)."""
        if not values:
            return np.zeros(0, np.int64)
        found = self.index.lookup(list(values))  # vocab index: row + 2
        return np.where(found >= RESERVED, found - RESERVED, -1)


class RequestEncoder:
    """Encodes the user part of requests against one run's prepared tables.

    Args:
        fitted: the run's fitted feature state.
        users: ``prepared/users.parquet`` (every known user's encoded row).
        catalogue: ``prepared/items.parquet`` (row number = catalogue row).
    """

    def __init__(self, fitted: FeatureStateSet, users: pa.Table, catalogue: pa.Table):
        self.state = fitted.user
        self.user_map = IdMap(users[fitted.user_id])
        self.item_map = IdMap(catalogue[fitted.item_id])
        cols = tower_columns(users.column_names, USER)
        self.stored = {c: column_to_numpy(users[c]) for c in cols}  # [U, ...] each
        self.seen_offsets, self.seen_rows = _distinct_per_user(users[SEEN])
        self.key = fitted.user_id
        self.id_features = id_feature_names(self.state, fitted.user_id)
        self.sequences = {n: s for n, s in self.state.features.items()
                          if s.type is FeatureKind.SEQUENCE}
        self.item_features = {f: column_to_numpy(catalogue[column_name(ITEM, f)])
                              for s in self.sequences.values() for f in s.item_features}
        self.sources = self._sources()
        self.absent = self._absent_row()

    def _sources(self) -> dict[str, list[str]]:
        """Source column -> the non-id, non-sequence features a request may set from it."""
        out: dict[str, list[str]] = {}
        for name, st in self.state.features.items():
            if st.spec.table_column and name not in self.id_features:
                out.setdefault(st.source, []).append(name)
        return out

    def _absent_row(self) -> Columns:
        """The row prepare gives a user absent from the user table: every feature null."""
        row = prefixed(USER, absent_row(self.state, skip=self.id_features))
        row.update(self._history_columns([], np.zeros(0, np.int64)))
        return row

    def user_row(self, user_id: RawId | None) -> int:
        """Row of ``user_id`` in users.parquet, or -1 when unknown or absent."""
        return -1 if user_id is None else self.user_map.row(user_id)

    def item_rows(self, item_ids: list[RawId]) -> np.ndarray:
        """[N] catalogue rows of raw item ids (-1 for ids not in the catalogue)."""
        return self.item_map.rows(item_ids)

    def known_item_rows(self, item_ids: list[RawId], field: str) -> np.ndarray:
        """[N] catalogue rows; an unknown id raises naming ``field`` (and its position)."""
        rows = self.item_rows(item_ids)
        missing = np.flatnonzero(rows < 0)
        if len(missing):
            i = int(missing[0])
            loc = (field,) if field == "item_id" else (field, i)
            name = field if field == "item_id" else f"{field}[{i}]"
            raise UnknownItemError(loc, item_ids[i], f"{name}={item_ids[i]!r} is not in the "
                                   f"catalogue of {len(self.item_map)} items")
        return rows

    def encode(self, query: Any) -> EncodedUser:
        """The user-tower columns ([1, ...] each) and seen rows of one request."""
        row = self.user_row(query.user_id)
        if row >= 0:
            columns = {c: a[row:row + 1] for c, a in self.stored.items()}
            seen = self.seen_rows[self.seen_offsets[row]:self.seen_offsets[row + 1]]
        else:
            columns = dict(self.absent)
            columns.update(self._id_columns(query.user_id))
            seen = np.zeros(0, np.int64)
        if query.features:
            columns.update(self._feature_columns(query.features))
        if query.history is not None:
            rows = self.item_rows(query.history)
            known = np.flatnonzero(rows >= 0)  # prepare drops items not in the catalogue
            history = [query.history[i] for i in known]
            columns.update(self._history_columns(history, rows[known]))
            seen = distinct(np.concatenate([seen, rows[known]]))
        plain = row >= 0 and not query.features and query.history is None
        return EncodedUser(columns, seen, row if plain else -1)

    def _id_columns(self, user_id: RawId | None) -> Columns:
        """The id features of a user not in users.parquet (unseen -> OOV, none -> padding)."""
        ids = pa.nulls(1) if user_id is None else _id_array([user_id])
        return id_columns(self.state, self.key, ids)

    def _feature_columns(self, features: dict[str, FeatureValue]) -> Columns:
        """Encode ``features`` (raw values by source column) with the fitted state."""
        out: Columns = {}
        for source, value in features.items():
            if source not in self.sources:
                raise RequestError(("features", source), value, (
                    f"features.{source} is not a user feature column; accepted: "
                    f"{sorted(self.sources)} (the user id goes in user_id, the history in "
                    "history)"))
            for name in self.sources[source]:
                st = self.state.features[name]
                try:
                    out.update(prefixed(USER, encode_feature(raw_array(value, st), st, name)))
                except (ValueError, TypeError, pa.ArrowException) as err:
                    raise RequestError(("features", source), value, (
                        f"features.{source}={value!r} cannot be encoded as the {st.type.value} "
                        f"feature {name!r}: {err}")) from None
        return out

    def _history_columns(self, history: list[RawId], rows: np.ndarray) -> Columns:
        """Every sequence feature from raw history ids and their catalogue rows [N]."""
        offsets = np.array([0, len(history)], np.int64)
        lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _id_array(history))
        ids, at = {}, {}
        for name, st in self.sequences.items():
            ids[name] = encode_sequence(lists, st.vocab_index(), st.max_length)  # [1, L]
            at[name] = pad_bags(rows + 1, offsets, st.max_length, pre=True) - 1  # -1: padding
        return history_columns(self.state, ids, at, self.item_features)


def _distinct_per_user(seen: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's seen rows, sorted and distinct, once at load: ``(offsets [U + 1], rows)``.

    A request then takes its user's slice as it is (no sort per request).
    """
    seen = seen.combine_chunks()
    offsets = np.asarray(seen.offsets, dtype=np.int64)
    values = seen.values.to_numpy(zero_copy_only=False).astype(np.int64)
    values = values[offsets[0]:offsets[-1]]
    if not len(values):
        return np.zeros(len(offsets), np.int64), values
    users = len(offsets) - 1
    span = int(values.max()) + 2  # (user, row + 1) as one key: row -1 stays in its user
    owner = np.repeat(np.arange(users, dtype=np.int64), np.diff(offsets))
    keys = distinct(owner * span + values + 1)
    counts = np.bincount(keys // span, minlength=users)
    return np.r_[0, np.cumsum(counts)].astype(np.int64), keys % span - 1


def _id_array(ids: list[Any]) -> pa.Array:
    """Raw ids as one Arrow array; a list mixing integers and strings becomes text.

    ``lookup`` compares text with an integer vocabulary as text, so ``[7, "x"]`` finds 7
    and leaves "x" unseen, as it would in separate requests (``transforms.as_arrow``).
    """
    return as_arrow(ids)
