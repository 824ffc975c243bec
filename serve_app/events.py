"""The events log: every event ``POST /events`` accepted, as Parquet the next prepare reads.

One file per accepted request, ``events-TIME_NS-RANDOM.parquet`` in ``serve.events_dir``
(default: ``events/`` beside the run directories, so that every run of one folder shares
it), written to a hidden name, flushed to disk and renamed into place: a reader sees whole
files only. Columns are the run's own interaction columns (``data.user_id``,
``data.item_id``, ``data.timestamp``, and ``data.weight`` or ``weight``), so the folder is
an interactions source as it is: ``data.extra_interactions: runs/events`` in the next
run's config (``jobs.prepare`` reads it beside ``data.interactions``).

Every event is logged, items unknown to the catalogue included (a later catalogue may hold
them); only known items enter the user-state store (:mod:`serve_app.user_store`), as
prepare drops interactions with unknown items.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PREFIX, SUFFIX = "events-", ".parquet"


@dataclass(frozen=True)
class LogColumns:
    """The log's column names (the run's interaction columns) and key types."""

    user_id: str
    item_id: str
    timestamp: str
    weight: str
    user_type: pa.DataType
    item_type: pa.DataType

    def schema(self) -> pa.Schema:
        """The Arrow schema of every log file."""
        return pa.schema([(self.user_id, self.user_type), (self.item_id, self.item_type),
                          (self.timestamp, pa.int64()), (self.weight, pa.float64())])


class EventLog:
    """A folder of events files.

    Args:
        folder: where the files go (made on first write).
        columns: their column names and key types.
    """

    def __init__(self, folder: str | Path, columns: LogColumns):
        self.folder, self.columns = Path(folder), columns

    def write(self, users: Sequence[Any], items: Sequence[Any], times: Sequence[int],
              weights: Sequence[float | None]) -> str:
        """Write one file of events, durably; returns its name."""
        c = self.columns
        table = pa.table({c.user_id: pa.array(users, c.user_type),
                          c.item_id: pa.array(items, c.item_type),
                          c.timestamp: pa.array(times, pa.int64()),
                          c.weight: pa.array(weights, pa.float64())}, schema=c.schema())
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{PREFIX}{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{SUFFIX}"
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)
        _fsync_dir(self.folder)
        return name

    def remove(self, name: str) -> None:
        """Delete a file written by :meth:`write` (its request failed before answering)."""
        (self.folder / name).unlink(missing_ok=True)

    def files(self) -> list[str]:
        """Names of the complete files, oldest first."""
        if not self.folder.is_dir():
            return []
        return sorted(p.name for p in self.folder.iterdir()
                      if p.name.startswith(PREFIX) and p.name.endswith(SUFFIX))

    def read(self, name: str) -> pa.Table:
        """One file's events."""
        return pq.read_table(self.folder / name)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
