"""Request -> user-tower columns, encoded exactly as the prepare step encodes a row.

A request's user part is assembled in three layers, each with ``pipeline.transforms``:

1. the base row: a known user's state from the user-state store
   (:mod:`serve_app.user_store`: the row prepare wrote, with the items of the events
   posted since appended to its history), or for an unknown / absent user the all-null
   row prepare gives users missing from the user table, with the id feature encoded from
   the request's id (unseen -> out-of-vocabulary, none -> padding);
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

from pipeline.arrow import column_to_numpy
from pipeline.columns import ITEM, USER, column_name, prefixed
from pipeline.features import InputForm, encode_feature, spec_of
from pipeline.rows import absent_row, history_columns, id_columns, id_feature_names
from pipeline.state import RESERVED, FeatureState, FeatureStateSet
from pipeline.transforms import (
    VocabIndex,
    as_arrow,
    distinct,
    encode_sequence,
    pad_bags,
    vocab_index,
)
from serve_app.request_errors import RequestError, UnknownItemError
from serve_app.schemas import FeatureValue, RawId
from serve_app.user_store import UserState

Columns = dict[str, np.ndarray]  # "user__NAME" -> [1, ...] (one request) or [B, ...]


@dataclass(frozen=True)
class EncodedUser:
    """One request's user-tower columns and the catalogue rows it has already seen.

    Attributes:
        columns: ``user__NAME`` -> [1, ...] arrays, as in ``prepared/users.parquet``.
        seen: [S] int64 distinct catalogue rows: stored seen items, the items of the
            events posted since, and the request's history.
        embedding: [D] the embedding the index build wrote for the user's prepared row,
            when the request is that row exactly (a known id, no event since, no
            ``features``, no ``history``); else None and the tower runs.
        state_version: events applied to a known user's state since prepare (0: as
            prepared); None for a user the store does not hold.
    """

    columns: Columns
    seen: np.ndarray
    embedding: np.ndarray | None = None
    state_version: int | None = None


def null_array(state: FeatureState) -> pa.Array:
    """A one-row null of the raw type a feature is encoded from (its kind's registry entry)."""
    return spec_of(state.type).null_array(state)


def raw_array(value: FeatureValue, state: FeatureState) -> pa.Array:
    """One raw JSON value as the one-row Arrow array its feature kind is encoded from.

    Raises:
        TypeError / ValueError / pyarrow.ArrowException: the value does not fit the kind.
    """
    return spec_of(state.type).raw_array(value, state)


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
        catalogue: ``prepared/items.parquet`` (row number = catalogue row).
    """

    def __init__(self, fitted: FeatureStateSet, catalogue: pa.Table):
        self.state = fitted.user
        self.item_map = IdMap(catalogue[fitted.item_id])
        self.item_ids = catalogue[fitted.item_id].to_pylist()  # row -> raw id
        self.key = fitted.user_id
        self.id_features = id_feature_names(self.state, fitted.user_id)
        self.sequences = {n: s for n, s in self.state.features.items()
                          if spec_of(s.type).form is InputForm.SEQUENCE}
        self.item_features = {f: column_to_numpy(catalogue[column_name(ITEM, f)])
                              for s in self.sequences.values() for f in s.item_features}
        self.sources = self._sources()
        self.absent = self._absent_row()

    def _sources(self) -> dict[str, list[str]]:
        """Source column -> the non-id, non-sequence features a request may set from it."""
        out: dict[str, list[str]] = {}
        for name, st in self.state.features.items():
            if spec_of(st.type).table_column and name not in self.id_features:
                out.setdefault(st.source, []).append(name)
        return out

    def _absent_row(self) -> Columns:
        """The row prepare gives a user absent from the user table: every feature null."""
        row = prefixed(USER, absent_row(self.state, skip=self.id_features))
        row.update(self._history_columns([], np.zeros(0, np.int64)))
        return row

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

    def encode(self, query: Any, state: UserState | None = None) -> EncodedUser:
        """The user-tower columns ([1, ...] each) and seen rows of one request.

        Args:
            query: the request (``user_id``, ``features``, ``history``).
            state: the user's state in the store; None for a user it does not hold.
        """
        if state is not None and state.prepared:
            columns = dict(state.columns)
            seen = state.seen.astype(np.int64)
        else:
            columns = dict(self.absent)
            columns.update(self._id_columns(query.user_id))
            seen = np.zeros(0, np.int64)
        if state is not None and state.version:
            rows = state.events["row"].astype(np.int64)
            columns.update(self._appended(columns, rows))
            seen = distinct(np.concatenate([seen, rows]))
        if query.features:
            columns.update(self._feature_columns(query.features))
        if query.history is not None:
            rows = self.item_rows(query.history)
            known = np.flatnonzero(rows >= 0)  # prepare drops items not in the catalogue
            history = [query.history[i] for i in known]
            columns.update(self._history_columns(history, rows[known]))
            seen = distinct(np.concatenate([seen, rows[known]]))
        plain = state is not None and not state.version and not query.features \
            and query.history is None
        return EncodedUser(columns, seen, state.embedding if plain else None,
                           None if state is None else state.version)

    def _appended(self, columns: Columns, rows: np.ndarray) -> Columns:
        """Every history column with the items of catalogue ``rows`` appended, last L kept.

        Encoding is per item (vocabulary id, item features), so appending encoded items to
        the encoded history is encoding the longer history, as prepare would.
        """
        suffix = self._history_columns([self.item_ids[r] for r in rows], rows)
        out: Columns = {}
        for name, st in self.sequences.items():
            ids = column_name(USER, name)
            before, after = columns[ids][0] != 0, suffix[ids][0] != 0  # 0: padding
            for col in (ids, *(column_name(USER, name, f) for f in st.item_features)):
                merged = np.concatenate([columns[col][0][before],
                                         suffix[col][0][after]])[-st.max_length:]
                laid = np.zeros((1, st.max_length), merged.dtype)
                laid[0, st.max_length - len(merged):] = merged
                out[col] = laid
        return out

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
            ids[name] = encode_sequence(lists, vocab_index(st), st.max_length)  # [1, L]
            at[name] = pad_bags(rows + 1, offsets, st.max_length, pre=True) - 1  # -1: padding
        return history_columns(self.state, ids, at, self.item_features)


def _id_array(ids: list[Any]) -> pa.Array:
    """Raw ids as one Arrow array; a list mixing integers and strings becomes text.

    ``lookup`` compares text with an integer vocabulary as text, so ``[7, "x"]`` finds 7
    and leaves "x" unseen, as it would in separate requests (``transforms.as_arrow``).
    """
    return as_arrow(ids)
