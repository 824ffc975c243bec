"""The user-state store's backends: LMDB on the node's disk, or Redis (bytes, never pickle).

Each backend keeps two values per user key, the base record and the appended events, and
the set of event-log files already applied; :class:`serve_app.user_store.UserStore` reads
and appends through this interface.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from serve_app.user_store import Layout, StoreUnavailable

MAP_SIZE = 1 << 40  # LMDB's address-space reservation; the file grows only as written
BUILD_BATCH = 65_536  # users per read batch and per write transaction when building


class Backend(ABC):
    """Bytes by key: base records, appended events, the applied log files."""

    @abstractmethod
    def get(self, keys: Sequence[bytes]) -> list[tuple[bytes | None, bytes | None]]:
        """(base record or None, events or None) of each key, in one read."""

    @abstractmethod
    def append(self, events: Sequence[tuple[bytes, bytes]], mark: str) -> bool:
        """Append each (key, event bytes) and mark log file ``mark`` applied, atomically.

        Returns False (and writes nothing) when ``mark`` was already applied.
        """

    @abstractmethod
    def applied(self) -> set[str]:
        """The log files applied to this store."""

    @abstractmethod
    def put_users(self, records: Iterable[tuple[bytes, bytes]]) -> None:
        """Write base records (building a store)."""

    @abstractmethod
    def mark(self, names: Iterable[str]) -> None:
        """Mark log files applied without applying them (their events are prepared)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release the connection or the environment."""


class LmdbBackend(Backend):
    """An LMDB environment: ``users``, ``events`` and ``applied`` databases.

    Args:
        folder: the environment's folder (``RUN_DIR/user_state``).
        create: make it (building); otherwise it must exist.
    """

    # LMDB allows one environment per file per process: retrievers of one run in one
    # process (a rollout to the same run, tests) share it, closed with the last of them.
    _open: dict[str, list] = {}  # real path -> [env, users, events, applied, holders]
    _lock = threading.Lock()

    def __init__(self, folder: Path, create: bool = False):
        import lmdb

        if not create and not (folder / "data.mdb").exists():
            raise FileNotFoundError(f"{folder / 'data.mdb'} is missing: run "
                                    "`python -m jobs.build_index` (it writes the store)")
        folder.mkdir(parents=True, exist_ok=True)
        self.path = os.path.realpath(folder)
        with self._lock:
            entry = self._open.get(self.path)
            if entry is None:
                env = lmdb.open(self.path, map_size=MAP_SIZE, max_dbs=3, readahead=False,
                                create=create)
                entry = [env, env.open_db(b"users"), env.open_db(b"events"),
                         env.open_db(b"applied"), 0]
                self._open[self.path] = entry
            entry[4] += 1
        self.env, self.users, self.events, self.log = entry[:4]
        self.closed = False

    def get(self, keys: Sequence[bytes]) -> list[tuple[bytes | None, bytes | None]]:
        """Both records of each key in one read transaction."""
        with self.env.begin(buffers=False) as txn:
            return [(txn.get(k, db=self.users), txn.get(k, db=self.events)) for k in keys]

    def append(self, events: Sequence[tuple[bytes, bytes]], mark: str) -> bool:
        """One write transaction: the mark (unless present), then each event appended."""
        with self.env.begin(write=True) as txn:
            if not txn.put(mark.encode(), b"", db=self.log, overwrite=False):
                return False
            for key, event in events:
                txn.put(key, (txn.get(key, db=self.events) or b"") + event, db=self.events)
        return True

    def applied(self) -> set[str]:
        """Every key of the ``applied`` database."""
        with self.env.begin() as txn:
            return {k.decode() for k in txn.cursor(db=self.log).iternext(values=False)}

    def put_users(self, records: Iterable[tuple[bytes, bytes]]) -> None:
        """One write transaction per call."""
        with self.env.begin(write=True) as txn:
            txn.cursor(db=self.users).putmulti(records)

    def mark(self, names: Iterable[str]) -> None:
        """Mark names applied."""
        with self.env.begin(write=True) as txn:
            for name in names:
                txn.put(name.encode(), b"", db=self.log)

    def records(self, batch: int = BUILD_BATCH) -> Iterable[list[tuple[bytes, bytes]]]:
        """Every base record, in key order, ``batch`` at a time (loading another backend)."""
        with self.env.begin() as txn:
            out = []
            for item in txn.cursor(db=self.users):
                out.append(item)
                if len(out) == batch:
                    yield out
                    out = []
            if out:
                yield out

    def close(self) -> None:
        """Release the environment (closed when no other backend in this process holds it)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            entry = self._open[self.path]
            entry[4] -= 1
            if entry[4] == 0:
                del self._open[self.path]
                self.env.close()


class RedisBackend(Backend):
    """Keys ``PREFIX u:KEY`` (base), ``PREFIX e:KEY`` (events), set ``PREFIX applied``.

    Args:
        url: ``redis://host:port/db``.
        prefix: the store's own prefix (``towerline:STORE_ID:``).
        timeout_s: socket timeout; a server that does not answer in time is down.
    """

    def __init__(self, url: str, prefix: str, timeout_s: float = 1.0):
        import redis

        self.errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s)
        self.url, self.prefix = url, prefix.encode()

    def _call(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self.errors as err:
            raise StoreUnavailable(f"the Redis user store at {self.url} does not answer "
                                   f"({type(err).__name__}: {err})") from None

    def get(self, keys: Sequence[bytes]) -> list[tuple[bytes | None, bytes | None]]:
        """One MGET of every base and events key."""
        names = [self.prefix + b"u:" + k for k in keys] + [self.prefix + b"e:" + k
                                                           for k in keys]
        values = self._call(lambda: self.client.mget(names)) if keys else []
        return list(zip(values[:len(keys)], values[len(keys):], strict=True))

    def append(self, events: Sequence[tuple[bytes, bytes]], mark: str) -> bool:
        """SADD the mark; when new, one MULTI of APPENDs."""
        def run() -> bool:
            if not self.client.sadd(self.prefix + b"applied", mark):
                return False
            pipe = self.client.pipeline(transaction=True)
            for key, event in events:
                pipe.append(self.prefix + b"e:" + key, event)
            pipe.execute()
            return True
        return self._call(run)

    def applied(self) -> set[str]:
        """SMEMBERS of the applied set."""
        return {m.decode() for m in self._call(
            lambda: self.client.smembers(self.prefix + b"applied"))}

    def put_users(self, records: Iterable[tuple[bytes, bytes]]) -> None:
        """One pipelined MSET."""
        mapping = {self.prefix + b"u:" + k: v for k, v in records}
        if mapping:
            self._call(lambda: self.client.mset(mapping))

    def mark(self, names: Iterable[str]) -> None:
        """SADD the names."""
        names = list(names)
        if names:
            self._call(lambda: self.client.sadd(self.prefix + b"applied", *names))

    def set_layout(self, layout: Layout) -> None:
        """Write the layout under the prefix: the store is complete."""
        self._call(lambda: self.client.set(self.prefix + b"layout",
                                           json.dumps(layout.to_json())))

    def has_layout(self) -> bool:
        """Whether a complete store is under the prefix."""
        return bool(self._call(lambda: self.client.exists(self.prefix + b"layout")))

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()


def redis_prefix(layout: Layout) -> str:
    """The key prefix of a run's records in Redis."""
    return f"towerline:{layout.store_id}:"
