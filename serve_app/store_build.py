"""Building a run's user-state store (``jobs.build_index``) and loading it into Redis.

:func:`build_embedded` streams ``users.parquet`` into ``RUN_DIR/user_state/`` (LMDB) beside
the index; :func:`load_redis` copies its records into a Redis server under the store's own
prefix (``python -m jobs.user_store``).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.arrow import column_to_numpy
from pipeline.columns import SEEN, USER, tower_columns
from pipeline.run_dir import RunDir, write_json
from serve_app.store_backends import BUILD_BATCH, LmdbBackend, RedisBackend, redis_prefix
from serve_app.user_store import LAYOUT, Column, Layout, distinct_per_user, encode_record, user_key


def build_embedded(run: RunDir, key: str, model_version: str,
                   embeddings: np.ndarray | None, applied: Sequence[str] = (),
                   log: Callable[[str], None] = print) -> Layout:
    """Write ``RUN_DIR/user_state/`` from ``users.parquet`` and the users' embeddings.

    Streams the user table ``BUILD_BATCH`` rows at a time, one write transaction each; the
    folder is written beside and renamed into place, so a reader never sees half a store.

    Args:
        run: the run directory.
        key: the user key column.
        model_version: the model the embeddings come from.
        embeddings: [U, D] float32 by ``users.parquet`` row, or None (no fast path).
        applied: events-log files whose events the prepared data already holds.
        log: progress lines (one per batch).
    """
    import shutil

    final = run.user_state
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}")
    start, written = time.perf_counter(), 0
    pf = pq.ParquetFile(run.table(USER))
    names = tower_columns(pf.schema_arrow.names, USER)
    backend = LmdbBackend(tmp, create=True)
    columns: tuple[Column, ...] | None = None
    try:
        for batch in pf.iter_batches(BUILD_BATCH, columns=[key, SEEN, *names]):
            arrays = {c: column_to_numpy(batch.column(c)) for c in names}
            if columns is None:
                columns = tuple(Column(c, np.dtype(a.dtype).newbyteorder("<").str,
                                       tuple(int(s) for s in a.shape[1:]))
                                for c, a in arrays.items())
            parts = [np.ascontiguousarray(arrays[c.name], c.dtype).reshape(len(batch), -1)
                     .view(np.uint8) for c in columns]
            if embeddings is not None:
                emb = np.ascontiguousarray(embeddings[written:written + len(batch)], "<f4")
                parts.append(emb.view(np.uint8))
            fixed = np.concatenate(parts, axis=1) if parts else np.zeros((len(batch), 0),
                                                                         np.uint8)
            offsets, seen = distinct_per_user(pa.chunked_array([batch.column(SEEN)]))
            keys = [user_key(k, batch.schema.field(key).type)
                    for k in batch.column(key).to_pylist()]
            backend.put_users(sorted(
                (k, encode_record(fixed[i].tobytes(), seen[offsets[i]:offsets[i + 1]]))
                for i, k in enumerate(keys)))
            written += len(batch)
            log(f"[user_state] {written:,} users written ({time.perf_counter() - start:.1f}s)")
        backend.mark(applied)
    finally:
        backend.close()
    key_type = "int64" if pa.types.is_integer(pf.schema_arrow.field(key).type) else "string"
    layout = Layout(store_id=f"{model_version}-{uuid.uuid4().hex[:8]}",
                    model_version=model_version, key_type=key_type,
                    columns=columns or (), users=written, applied=tuple(applied),
                    embedding_dim=0 if embeddings is None else int(embeddings.shape[1]))
    write_json(tmp / LAYOUT, layout.to_json())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    log(f"[user_state] {written:,} users in {final} ({time.perf_counter() - start:.1f}s)")
    return layout


def load_redis(run: RunDir, url: str, log: Callable[[str], None] = print) -> str:
    """Copy a run's embedded store into Redis under its own prefix; returns the prefix.

    The layout key is written last: a replica refuses a prefix without it.
    """
    layout = Layout.read(run.user_state)
    source = LmdbBackend(run.user_state)
    target = RedisBackend(url, redis_prefix(layout), timeout_s=30.0)
    done = 0
    try:
        for batch in source.records():
            target.put_users(batch)
            done += len(batch)
            log(f"[user_state] {done:,} of {layout.users:,} users loaded into {url}")
        target.mark(layout.applied)  # events posted since the build: replayed from the log
        target.set_layout(layout)
    finally:
        source.close()
        target.close()
    return redis_prefix(layout)
