"""Choosing, building and loading a top-k index (``ids.npy``, the index, its :class:`TopKMeta`)."""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np
import torch

from indexing.topk.base import IDS_FILE, TopK, TopKMeta
from indexing.topk.exact import EMBEDDINGS_FILE, EXACT, ExactTopK
from indexing.topk.faiss_index import FLAT_MAX_ITEMS, INDEX_FILE, MIN_POINTS_PER_CENTROID, FaissTopK
from indexing.topk.kernels import _as_float32
from pipeline.config.model import Similarity

HNSW_MAX_ITEMS = 1_000_000


def default_factory(n_items: int, dim: int) -> str:
    """A sensible factory for a catalogue size: Flat, then HNSW32, then IVF.

    Below 50k items exact "Flat" is fast enough; up to 1e6 "HNSW32"; beyond,
    ``IVF{4 * sqrt(n)},Flat`` with nlist at most n / 39 (faiss's minimum points per
    centroid). ``dim`` only has to be valid: none of these choices depends on it.

    Args:
        n_items: catalogue size N >= 1.
        dim: vector width D >= 1.

    Returns:
        A faiss index-factory string.
    """
    if n_items < 1 or dim < 1:
        raise ValueError(f"n_items={n_items} and dim={dim} must both be >= 1")
    if n_items < FLAT_MAX_ITEMS:
        return "Flat"
    if n_items <= HNSW_MAX_ITEMS:
        return "HNSW32"
    nlist = min(int(4 * math.sqrt(n_items)), n_items // MIN_POINTS_PER_CENTROID)
    return f"IVF{nlist},Flat"


def build_topk(
    embeddings: np.ndarray | torch.Tensor,
    ids: np.ndarray | torch.Tensor,
    similarity: Similarity | str,
    factory: str | None = None,
    params: dict | None = None,
) -> TopK:
    """Exact search for ``factory="exact"``, else a faiss index (default: :func:`default_factory`).

    Args:
        embeddings: [N, D] item vectors.
        ids: [N] item ids.
        similarity: dot or cosine.
        factory: "exact", a faiss index-factory string, or None for the default.
        params: faiss parameters (not accepted with "exact").

    Returns:
        A :class:`TopK`.
    """
    if factory == EXACT:
        if params:
            raise ValueError(f"params {params} do not apply to factory '{EXACT}'")
        return ExactTopK(embeddings, ids, similarity)
    n, dim = _as_float32(embeddings, "embeddings").shape
    return FaissTopK(embeddings, ids, similarity, factory or default_factory(n, dim), params)


def load_topk(directory: str | Path, meta: TopKMeta) -> TopK:
    """Read a :class:`TopK` written by ``save``; its searches give identical results.

    Args:
        directory: folder holding ``ids.npy`` and the index file.
        meta: what ``save`` returned (a run directory keeps it in ``index/manifest.json``).

    Returns:
        An :class:`ExactTopK` or :class:`FaissTopK`.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: a file does not read as what ``save`` wrote, or disagrees with ``meta``
            (named, with the reason): a truncated or foreign ``index.faiss``, another count.
    """
    directory = Path(directory)
    ids = _read_npy(directory / IDS_FILE)
    if ids.ndim != 1 or len(ids) != meta.count:
        raise ValueError(f"{directory / IDS_FILE} holds {ids.shape} ids; the index metadata "
                         f"says count={meta.count}")
    if meta.kind == EXACT:
        vectors = _read_npy(directory / EMBEDDINGS_FILE)
        if vectors.shape != (meta.count, meta.dim):
            raise ValueError(f"{directory / EMBEDDINGS_FILE} has shape {vectors.shape}; the "
                             f"index metadata says ({meta.count}, {meta.dim})")
        return ExactTopK._from_vectors(vectors, ids, meta)
    if meta.kind == FaissTopK.kind:
        index = _read_faiss(directory / INDEX_FILE)
        if (index.ntotal, index.d) != (meta.count, meta.dim):
            raise ValueError(f"{directory / INDEX_FILE} holds {index.ntotal} vectors of dim "
                             f"{index.d}; the index metadata says {meta.count} of dim "
                             f"{meta.dim}")
        return FaissTopK._from_index(index, ids, meta)
    raise ValueError(f"index metadata kind {meta.kind!r}; expected '{EXACT}' or "
                     f"'{FaissTopK.kind}'")


def _read_npy(path: Path) -> np.ndarray:
    """A ``.npy`` array written with ``allow_pickle=False``."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.build_index`")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npy array ({err})") from None


def _read_faiss(path: Path) -> faiss.Index:
    """``faiss.read_index``, its RuntimeError (a truncated file) as a ValueError naming it."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.build_index`")
    try:
        return faiss.read_index(str(path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise ValueError(f"{path}: not a readable faiss index, truncated or corrupt "
                         f"({reason[:200]}): rebuild it with jobs.build_index") from None
