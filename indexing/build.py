"""Build ``RUN_DIR/index/``: item embeddings -> FAISS index + id map + manifest.

The index stores catalogue row numbers (``item_index``) as its ids; ``prepared/items.parquet``
maps a row to the raw item id. :class:`IndexManifest` (``index/manifest.json``) is the
index's one metadata file: what loads it (:class:`~indexing.topk.base.TopKMeta`: kind,
factory, similarity, dimension, item count, search parameters), what a server needs to
refuse an index that does not belong to its model or catalogue (model version,
feature-state hash, catalogue hash), and the recall@K of the index against exact search on
sampled users.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from indexing.topk.base import TopK, TopKMeta
from indexing.topk.store import build_topk, default_factory, load_topk
from pipeline.columns import ITEM
from pipeline.config.index import IndexConfig
from pipeline.config.model import Similarity
from pipeline.run_dir import (
    MANIFEST,
    ModelMeta,
    RunDir,
    atomic_dir,
    catalogue_hash,
    read_meta,
    read_table,
    write_json,
)
from pipeline.strict import StrictModel

Log = Callable[[str], None]


class RecallCheck(StrictModel):
    """Recall@k of the index against exact search on sampled users."""

    k: int
    users: int
    value: float


class IndexManifest(StrictModel):
    """``index/manifest.json``: the index's one metadata file."""

    index: TopKMeta = Field(description="What loads the index files (load_topk).")
    model_version: str = Field(description="The model whose item embeddings it holds.")
    feature_state_hash: str = Field(description="The feature state that model was fit on.")
    recall: RecallCheck
    ids: str = Field(description="What the index's ids are.")
    catalogue_hash: str = Field(description="catalogue_hash() of the catalogue's id column "
                                "in row order: a reordered or edited items.parquet is refused.")
    build_seconds: float
    embeddings: dict[str, str] = Field(default_factory=dict)


def read_index_manifest(run: RunDir) -> IndexManifest:
    """``index/manifest.json``."""
    return read_meta(run.index / MANIFEST, IndexManifest, "run `python -m jobs.build_index`")


def recall_at_k(index: TopK, exact: TopK, queries: np.ndarray, k: int) -> float:
    """Mean overlap of the index's top-k with the exact top-k, over ``queries`` [Q, D]."""
    return overlap(index.search(queries, k)[1], exact.search(queries, k)[1])


def overlap(got: np.ndarray, want: np.ndarray) -> float:
    """Mean share of each row of ``want`` [Q, k] ids (-1 = none) found in that row of ``got``."""
    hits = [len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, (w >= 0).sum())
            for g, w in zip(got, want, strict=True)]
    return float(np.mean(hits))


def reach_recall(index: TopK, queries: np.ndarray, want: np.ndarray, target: float | None,
                 log: Log = print) -> float:
    """Double the index's search effort until its recall@k on ``queries`` reaches ``target``.

    The effort is :meth:`TopK.search_effort` (efSearch of HNSW, nprobe of IVF), raised up to
    its cap; an index without one (Flat, exact) is left as it is. How far an ANN index
    falls short at a fixed setting depends on the data: on the 10^6 generated items of
    ``benchmarks.serve_latency`` (one epoch: item vectors crowded in a narrow cone, users
    nearly orthogonal to it) HNSW32 had recall@100 0.18 at efSearch 128 and 0.50 at 1,024,
    where on generated clustered vectors it had 0.94 at 128 (README, "FAISS index types").

    Args:
        index: the built index; its parameters are changed in place (``index.params``).
        queries: [Q, D] the sampled users of the recall check.
        want: [Q, k] their exact top-k ids.
        target: ``index.target_recall``; None keeps the parameters as configured.
        log: where each step and a shortfall are written.

    Returns:
        recall@k at the final setting.
    """
    k = want.shape[1]
    recall = overlap(index.search(queries, k)[1], want)
    effort = index.search_effort() if target is not None else None
    if effort is None:
        return recall
    name, value, cap = effort
    if recall < target:
        log(f"[index] recall@{k} {recall:.4f} at {name} {value} is below index.target_recall "
            f"{target}: raising {name} (up to {cap})")
    while recall < target and value < cap:
        value = min(2 * value, cap)
        index.set_params({name: value})
        recall = overlap(index.search(queries, k)[1], want)
        log(f"[index] {name} {value}: recall@{k} {recall:.4f} (target {target})")
    if recall < target:
        log(f"[index] WARNING: recall@{k} {recall:.4f} is below index.target_recall "
            f"{target} at {name} {value}, the most this build tries; a Flat index is exact, "
            f"or set index.factory / index.params yourself")
    return recall


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row numbers out of ``n`` (all of them when ``n <= size``)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def build_index(cfg: IndexConfig, run: RunDir, meta: ModelMeta, item_emb: np.ndarray,
                user_emb: np.ndarray, seed: int = 0, embeddings: dict[str, str] | None = None,
                log: Log = print) -> IndexManifest:
    """Build, check and write the index over ``item_emb`` [I, D] (row = item_index).

    ``user_emb`` [U, D] supplies the sampled queries of the recall check; ``meta`` is the
    model the embeddings came from (its similarity decides the metric).
    """
    t0 = time.perf_counter()
    similarity = meta.config.model.similarity  # as trained
    n, dim = item_emb.shape
    factory = cfg.factory or default_factory(n, dim)
    rows = np.arange(n, dtype=np.int64)
    index = build_topk(item_emb, rows, similarity, factory, dict(cfg.params))
    exact = build_topk(item_emb, rows, similarity, "exact", {})
    queries = user_emb[sample_rows(len(user_emb), cfg.recall_users, seed)]
    k = min(cfg.recall_k, n)
    recall = reach_recall(index, queries, exact.search(queries, k)[1], cfg.target_recall, log)
    build_s = time.perf_counter() - t0
    with atomic_dir(run.index) as tmp:
        manifest = IndexManifest(
            index=index.save(tmp), model_version=meta.model_version,
            feature_state_hash=meta.feature_state_hash,
            recall=RecallCheck(k=k, users=len(queries), value=recall),
            ids="catalogue rows (item_index) of prepared/items.parquet",
            catalogue_hash=catalogue_hash(catalogue_ids(run, meta)),
            build_seconds=round(build_s, 3), embeddings=dict(embeddings or {}))
        write_json(tmp / MANIFEST, manifest.model_dump(mode="json"))
    log(f"[index] {factory} over {n:,} items, dim {dim}: recall@{k} {recall:.4f} "
        f"on {len(queries)} users ({build_s:.1f}s) -> {run.index}")
    return manifest


def catalogue_ids(run: RunDir, meta: ModelMeta) -> pa.ChunkedArray:
    """The id column of ``prepared/items.parquet`` (row i = index id i)."""
    key = meta.config.data.item_id
    table = read_table(run, ITEM)
    if key not in table.column_names:
        raise ValueError(f"{run.table(ITEM)} has no id column {key!r} (data.item_id); "
                         f"columns: {table.column_names}")
    return table[key]


def check_catalogue(manifest: IndexManifest, run: RunDir, ids: pa.ChunkedArray) -> None:
    """Refuse a catalogue that is not, row for row, the one the index was built over.

    Raises:
        ValueError: naming ``prepared/items.parquet``, both counts or both hashes.
    """
    if manifest.index.count != len(ids):
        raise ValueError(f"index manifest index.count={manifest.index.count} but "
                         f"{run.table(ITEM)} has {len(ids)} rows: rebuild the index with "
                         "jobs.build_index")
    found = catalogue_hash(ids)
    if found != manifest.catalogue_hash:
        raise ValueError(f"{run.table(ITEM)} id column hashes to {found}, but the index was "
                         f"built over catalogue_hash={manifest.catalogue_hash} (rows reordered "
                         "or ids changed): rebuild the index with jobs.build_index")


def check_manifest(manifest: IndexManifest, meta: ModelMeta) -> None:
    """Refuse an index built for another model.

    Raises:
        ValueError: naming the field that differs, the index's value and the model's.
    """
    pairs = {"model_version": (manifest.model_version, meta.model_version),
             "feature_state_hash": (manifest.feature_state_hash, meta.feature_state_hash),
             "similarity": (manifest.index.similarity, meta.config.model.similarity),
             "dim": (manifest.index.dim, meta.config.model.output_dim)}
    for key, (got, value) in pairs.items():
        if got != value:
            raise ValueError(f"index manifest {key}={_plain(got)!r} does not match the "
                             f"model's {key}={_plain(value)!r}: rebuild the index with "
                             "jobs.build_index")


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Similarity) else value


def load_index(run: RunDir, meta: ModelMeta) -> tuple[TopK, IndexManifest]:
    """The index of a run directory, checked against the model that will query it."""
    manifest = read_index_manifest(run)
    check_manifest(manifest, meta)
    return load_topk(run.index, manifest.index), manifest
