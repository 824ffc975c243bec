"""Build ``RUN_DIR/index/``: item embeddings -> FAISS index + id map + manifest.

The index stores catalogue row numbers (``item_index``) as its ids; ``prepared/items.parquet``
maps a row to the raw item id. The manifest carries what a server needs to refuse an index
that does not belong to its model: model version, feature-state hash, similarity, metric,
dimension, normalisation, item count, index type and parameters, and the recall@K of the
index against exact search on sampled users.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.config_model import Similarity
from towers.topk import TopK, build_topk, default_factory, load_topk
from training.checkpoint import read_meta

MANIFEST = "manifest.json"
Log = Callable[[str], None]


def index_dir(run_dir: Path) -> Path:
    """``RUN_DIR/index``."""
    return Path(run_dir) / "index"


def recall_at_k(index: TopK, exact: TopK, queries: np.ndarray, k: int) -> float:
    """Mean overlap of the index's top-k with the exact top-k, over ``queries`` [Q, D]."""
    _, got = index.search(queries, k)
    _, want = exact.search(queries, k)
    hits = [len(set(g[g >= 0]) & set(w[w >= 0])) / max(1, (w >= 0).sum())
            for g, w in zip(got, want, strict=True)]
    return float(np.mean(hits))


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row numbers out of ``n`` (all of them when ``n <= size``)."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def build_index(cfg: Config, run_dir: Path, item_emb: np.ndarray, user_emb: np.ndarray,
                extra: dict[str, Any] | None = None, log: Log = print) -> dict[str, Any]:
    """Build, check and write the index over ``item_emb`` [I, D] (row = item_index).

    ``user_emb`` [U, D] supplies the sampled queries of the recall check.
    """
    t0 = time.perf_counter()
    meta = read_meta(Path(run_dir) / "model")
    similarity = Similarity(meta["config"]["model"]["similarity"])  # as trained
    n, dim = item_emb.shape
    factory = cfg.index.factory or default_factory(n, dim)
    rows = np.arange(n, dtype=np.int64)
    index = build_topk(item_emb, rows, similarity, factory, dict(cfg.index.params))
    exact = build_topk(item_emb, rows, similarity, "exact", {})
    queries = user_emb[sample_rows(len(user_emb), cfg.index.recall_users, cfg.train.seed)]
    k = min(cfg.index.recall_k, n)
    recall = recall_at_k(index, exact, queries, k)
    build_s = time.perf_counter() - t0
    out, tmp = index_dir(run_dir), Path(run_dir) / ".index.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    index.save(tmp)
    manifest = {
        "model_version": meta["model_version"],
        "feature_state_hash": meta["feature_state_hash"],
        "similarity": similarity.value,
        "metric": "inner_product",
        "normalized": similarity is Similarity.COSINE,
        "dim": int(dim), "item_count": int(n),
        "index_type": factory, "params": dict(cfg.index.params),
        "recall": {"k": k, "users": len(queries), "value": recall},
        "ids": "catalogue rows (item_index) of prepared/items.parquet",
        "build_seconds": round(build_s, 3),
        **(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"[index] {factory} over {n:,} items, dim {dim}: recall@{k} {recall:.4f} "
        f"on {len(queries)} users ({build_s:.1f}s) -> {out}")
    return manifest


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """``RUN_DIR/index/manifest.json``."""
    path = index_dir(run_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.build_index` first")
    return json.loads(path.read_text())


def check_manifest(manifest: dict[str, Any], model_meta: dict[str, Any],
                   similarity: Similarity, dim: int) -> None:
    """Refuse an index built for another model.

    Raises:
        ValueError: naming the field that differs, the index's value and the model's.
    """
    want = {"model_version": model_meta["model_version"],
            "feature_state_hash": model_meta["feature_state_hash"],
            "similarity": similarity.value, "dim": dim}
    for key, value in want.items():
        if manifest.get(key) != value:
            raise ValueError(f"index manifest {key}={manifest.get(key)!r} does not match the "
                             f"model's {key}={value!r}: rebuild the index with jobs.build_index")


def load_index(run_dir: Path, model_meta: dict[str, Any], similarity: Similarity, dim: int
               ) -> tuple[TopK, dict[str, Any]]:
    """The index of a run directory, checked against the model that will query it."""
    manifest = read_manifest(run_dir)
    check_manifest(manifest, model_meta, similarity, dim)
    return load_topk(index_dir(run_dir)), manifest

