"""User state outside the replica: each user's prepared row, seen items and events.

A replica no longer loads every user. It reads the users of each request from a store
that ``jobs.build_index`` writes beside the index (``RUN_DIR/user_state/``) and that
``POST /events`` appends to (``serve.user_store``):

- ``embedded`` (the default): an LMDB environment on the node's disk. Memory-mapped, so
  the replicas on one node share one copy through the page cache and a replica's RSS does
  not grow with the audience; readers never block; a write is a transaction, serialised
  across processes by LMDB's own lock.
- ``redis``: the same records in a Redis server, for replicas on several nodes. Loaded from
  the run's embedded store by ``python -m jobs.user_store RUN_DIR --redis-url URL`` under
  a prefix of the run's own (``towerline:STORE_ID:``), so a new run's records sit beside
  the old run's until the rollout swaps them.
- ``memory``: the path before the store: every replica reads ``prepared/users.parquet``
  and the stored user embeddings whole. Read-only (``/events`` answers 409); kept as the
  baseline ``benchmarks.user_state`` measures the store against.

What a user is, in every backend (:class:`UserState`):

- the **base record**, as prepared: the user's encoded ``users.parquet`` row (features and
  latest history, the columns the tower reads), its distinct seen catalogue rows, and the
  embedding the index build computed from that row;
- the **events** appended since, each a (catalogue row, time) pair of int64, in arrival
  order. ``append`` is one LMDB write transaction or one Redis ``MULTI`` of ``APPEND``s:
  atomic, and done before ``/events`` answers. A user with events is encoded afresh
  (:meth:`serve_app.encode.RequestEncoder.encode`): its history is the stored one with the
  events' items appended, its seen items include them, and the stored embedding no longer
  applies.

The backends are in :mod:`serve_app.store_backends`; building a store from a run (and
loading Redis) in :mod:`serve_app.store_build`.

Records are bytes in a layout of the run's own (``layout.json``: each column's name, dtype
and shape, the embedding width), read with ``numpy.frombuffer``: no pickle anywhere.

Events files of the log (:mod:`serve_app.events`) are applied to a store once: each
``append`` names the log file its events were written to, and the store keeps the set of
applied names in the same transaction. :meth:`UserStore.replay` applies the files a store
has not seen (events posted to the old run while a new one was being built and rolled out).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from pipeline.arrow import column_to_numpy
from pipeline.columns import SEEN, USER, tower_columns
from pipeline.state import RESERVED
from pipeline.transforms import VocabIndex, cast_like, distinct

LAYOUT = "layout.json"


EVENT = np.dtype([("row", "<i8"), ("time", "<i8")])  # one event in a store: 16 bytes


class StoreUnavailable(RuntimeError):
    """The store cannot be reached (HTTP 503 with ``Retry-After``)."""


class StoreReadOnly(RuntimeError):
    """The backend keeps no events (``serve.user_store: memory``; HTTP 409)."""


@dataclass(frozen=True)
class Column:
    """One encoded user column of a record: name, numpy dtype and per-user shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of one user's value."""
        return int(np.dtype(self.dtype).itemsize * int(np.prod(self.shape, dtype=np.int64)))


@dataclass(frozen=True)
class Layout:
    """How a run's records are laid out, and which store they belong to (``layout.json``).

    Attributes:
        store_id: unique per build: the Redis prefix, and what a rollout swaps.
        model_version: the model whose embeddings the records hold.
        key_type: the Arrow type of the user key (``int64`` or ``string``).
        columns: the encoded user columns, in record order.
        embedding_dim: width of the stored embedding; 0 when none is stored.
        users: users written.
        applied: events-log files already in the prepared data (never replayed).
    """

    store_id: str
    model_version: str
    key_type: str
    columns: tuple[Column, ...]
    embedding_dim: int
    users: int
    applied: tuple[str, ...] = ()

    @functools.cached_property
    def plan(self) -> tuple[tuple[str, np.dtype, int, tuple[int, ...], int], ...]:
        """Each column's (name, dtype, count, shape [1, ...], byte offset), worked out once."""
        out, at = [], 0
        for c in self.columns:
            count = int(np.prod(c.shape, dtype=np.int64))
            out.append((c.name, np.dtype(c.dtype), count, (1, *c.shape), at))
            at += c.nbytes
        return tuple(out)

    @functools.cached_property
    def columns_bytes(self) -> int:
        """Bytes of a record's columns (the embedding follows them)."""
        return sum(c.nbytes for c in self.columns)

    def arrow_key_type(self) -> pa.DataType:
        """The user key's Arrow type."""
        return pa.int64() if self.key_type == "int64" else pa.string()

    def to_json(self) -> dict[str, Any]:
        """The layout as written to ``layout.json``."""
        return {"store_id": self.store_id, "model_version": self.model_version,
                "key_type": self.key_type, "embedding_dim": self.embedding_dim,
                "users": self.users, "applied": list(self.applied),
                "columns": [{"name": c.name, "dtype": c.dtype, "shape": list(c.shape)}
                            for c in self.columns]}

    @classmethod
    def read(cls, folder: Path) -> Layout:
        """``folder/layout.json``.

        Raises:
            FileNotFoundError: no store was built there (names the command that builds it).
            ValueError: the file does not parse.
        """
        path = folder / LAYOUT
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the run has no user-state store; run "
                                    "`python -m jobs.build_index` (it writes the store)")
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            return cls(store_id=str(body["store_id"]), model_version=str(body["model_version"]),
                       key_type=str(body["key_type"]), embedding_dim=int(body["embedding_dim"]),
                       users=int(body["users"]), applied=tuple(body.get("applied", ())),
                       columns=tuple(Column(str(c["name"]), str(c["dtype"]), tuple(c["shape"]))
                                     for c in body["columns"]))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} does not parse ({err}); rebuild it with "
                             "`python -m jobs.build_index`") from None


@dataclass(frozen=True)
class UserState:
    """One known user as a store holds it.

    Attributes:
        columns: encoded user-tower columns as prepared, ``user__NAME`` -> [1, ...].
        seen: [S] int64 distinct catalogue rows seen as prepared.
        embedding: [D] float32 embedding of the prepared row, or None.
        events: [E] :data:`EVENT` records appended since prepare, oldest first.
        prepared: False for a user known from events only (no prepared row: the encoder
            starts from the absent-user row).
    """

    columns: dict[str, np.ndarray]
    seen: np.ndarray
    embedding: np.ndarray | None
    events: np.ndarray
    prepared: bool = True

    @property
    def version(self) -> int:
        """Events applied since prepare: 0 is the prepared state."""
        return len(self.events)


def user_key(value: Any, key_type: pa.DataType) -> bytes | None:
    """The store key of a raw user id (None where it cannot be a key of that type).

    Compared by the one rule of every lookup (``pipeline.transforms.cast_like``): "7" is
    the integer key 7, " 7" or "x" is no integer key.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int) and pa.types.is_integer(key_type):
        return b"%d" % value if -(1 << 63) <= value < (1 << 63) else None
    if isinstance(value, str) and pa.types.is_string(key_type):
        return value.encode("utf-8", "surrogatepass")
    try:
        cast, as_text = cast_like(pa.array([value]), key_type)
    except (pa.ArrowException, TypeError, OverflowError):
        return None
    if as_text or cast.null_count:
        return None
    v = cast[0].as_py()
    return b"%d" % v if isinstance(v, int) else str(v).encode("utf-8", "surrogatepass")


def encode_record(fixed: bytes, seen: np.ndarray) -> bytes:
    """One base record: the fixed part (columns, embedding), then the seen rows (int64)."""
    return fixed + np.ascontiguousarray(seen, dtype="<i8").tobytes()


def decode_state(layout: Layout, record: bytes, events: bytes | None) -> UserState:
    """A :class:`UserState` from a base record and its events' bytes."""
    buf = memoryview(record)
    columns = {name: np.frombuffer(buf, dtype, count, offset).reshape(shape)
               for name, dtype, count, shape, offset in layout.plan}
    at = layout.columns_bytes
    embedding = None
    if layout.embedding_dim:
        embedding = np.frombuffer(buf, "<f4", layout.embedding_dim, at)
        at += 4 * layout.embedding_dim
    seen = np.frombuffer(buf, "<i8", (len(buf) - at) // 8, at)
    ev = np.frombuffer(events, EVENT) if events else np.zeros(0, EVENT)
    return UserState(columns, seen, embedding, ev)


if TYPE_CHECKING:
    from serve_app.store_backends import Backend


class UserStore:
    """Users read and events appended through one backend, in a run's layout.

    Args:
        layout: the run's record layout.
        backend: where the records are.
    """

    read_only = False

    def __init__(self, layout: Layout, backend: Backend):
        self.layout, self.backend = layout, backend
        self.key_type = layout.arrow_key_type()

    def key(self, user_id: Any) -> bytes | None:
        """The store key of a raw id, None where it cannot be one."""
        return user_key(user_id, self.key_type)

    def read(self, user_ids: Sequence[Any]) -> list[UserState | None]:
        """Each user's state; None for ids the store does not hold.

        Raises:
            StoreUnavailable: the backend cannot be reached.
        """
        keys = [self.key(u) for u in user_ids]
        found = self.backend.get([k for k in keys if k is not None])
        out, it = [], iter(found)
        for k in keys:
            if k is None:
                out.append(None)
                continue
            record, events = next(it)
            if record is not None:
                out.append(decode_state(self.layout, record, events))
            elif events:  # known from events only
                out.append(UserState({}, np.zeros(0, np.int64), None,
                                     np.frombuffer(events, EVENT), prepared=False))
            else:
                out.append(None)
        return out

    def append(self, events: Sequence[tuple[bytes, int, int]], mark: str) -> bool:
        """Append (user key, catalogue row, time) events, as log file ``mark``'s, atomically.

        Returns False when ``mark`` was applied before (nothing written).
        """
        body = [(key, np.array([(row, t)], EVENT).tobytes()) for key, row, t in events]
        return self.backend.append(body, mark)

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()


class MemoryStore:
    """Today's path: ``users.parquet`` and the stored embeddings in this process; no events.

    Args:
        users: the prepared user table.
        key: its key column.
        embeddings: [U, D] stored embeddings by row, or None.
    """

    read_only = True

    def __init__(self, users: pa.Table, key: str, embeddings: np.ndarray | None):
        self.index = VocabIndex(users[key])
        self.columns = {c: column_to_numpy(users[c])
                        for c in tower_columns(users.column_names, USER)}
        self.seen_offsets, self.seen_rows = distinct_per_user(users[SEEN])
        self.embeddings = embeddings

    def read(self, user_ids: Sequence[Any]) -> list[UserState | None]:
        """Each known user's row as prepared (never any events)."""
        out = []
        for u in user_ids:
            found = self.index.lookup_one(u) if u is not None else -1
            if found < RESERVED:  # a vocabulary index is row + RESERVED
                out.append(None)
                continue
            row = found - RESERVED
            out.append(UserState(
                {c: a[row:row + 1] for c, a in self.columns.items()},
                self.seen_rows[self.seen_offsets[row]:self.seen_offsets[row + 1]],
                None if self.embeddings is None else self.embeddings[row],
                np.zeros(0, EVENT)))
        return out

    def append(self, events: Sequence[tuple[bytes, int, int]], mark: str) -> bool:
        """Refused: this backend keeps no events."""
        raise StoreReadOnly("serve.user_store is 'memory': users are read from "
                            "prepared/users.parquet and keep no events; serve with "
                            "user_store 'embedded' or 'redis' to post events")

    def key(self, user_id: Any) -> bytes | None:
        """No keys: the memory path takes no events."""
        return None

    def close(self) -> None:
        """Nothing to release."""


def distinct_per_user(seen: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Each user's seen rows, sorted and distinct: ``(offsets [U + 1], rows)``."""
    seen = seen.combine_chunks()
    offsets = np.asarray(seen.offsets, dtype=np.int64)
    values = seen.values.to_numpy(zero_copy_only=False).astype(np.int64)
    values = values[offsets[0]:offsets[-1]]
    offsets = offsets - offsets[0]
    if not len(values):
        return np.zeros(len(offsets), np.int64), values
    users = len(offsets) - 1
    span = int(values.max()) + 2  # (user, row + 1) as one key: row -1 stays in its user
    owner = np.repeat(np.arange(users, dtype=np.int64), np.diff(offsets))
    keys = distinct(owner * span + values + 1)
    counts = np.bincount(keys // span, minlength=users)
    return np.r_[0, np.cumsum(counts)].astype(np.int64), keys % span - 1
