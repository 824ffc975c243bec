"""Top-k retrieval over item embeddings: an exact oracle and FAISS behind one interface.

``TopK.search(queries, k, exclude)`` returns ``(scores [Q, k] float32, ids [Q, k] int64)``
with the caller's item ids (from the id map), best first. Fewer than ``k`` results (``k``
larger than the catalogue, exclusions, an ANN index that found fewer) are padded with id
``-1`` and score ``-inf``. Exclusion searches ``k + max(len(exclude[i]))`` and filters.

The similarity decides both normalisation and metric: ``cosine`` L2-normalises items and
queries and uses inner product; ``dot`` uses inner product on the raw vectors.

On disk (never pickle): ``topk.json`` {kind, factory, similarity, dim, count, params},
``ids.npy`` (``allow_pickle=False``), and ``index.faiss`` (``faiss.write_index``) or, for
the exact kind, the stored vectors as ``embeddings.npy``. ``load_topk(dir)`` reads either.

FAISS threads: left at faiss's default (OpenMP, all cores); set
``faiss.omp_set_num_threads`` in the caller (e.g. a Serve replica's ``num_cpus``). HNSW
graphs built with several threads differ between builds; a saved index searches the same.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import faiss
import numpy as np
import torch

from pipeline.config.model import Similarity

TOPK_JSON = "topk.json"
IDS_FILE = "ids.npy"
INDEX_FILE = "index.faiss"
EMBEDDINGS_FILE = "embeddings.npy"
EXACT = "exact"
PAD_ID = -1
FLAT_MAX_ITEMS = 50_000
HNSW_MAX_ITEMS = 1_000_000
MIN_POINTS_PER_CENTROID = 39  # below this faiss warns that k-means is under-trained
EXACT_CHUNK_ELEMENTS = 1 << 24  # scores per exact-search chunk: 64 MiB of float32


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero).

    Args:
        x: [N, D] float32.

    Returns:
        [N, D] float32.
    """
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _as_float32(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """A C-contiguous float32 [N, D] numpy copy of ``x``."""
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} has shape {x.shape}; expected [N, D]")
    return x


def as_searched(x: np.ndarray | torch.Tensor, similarity: Similarity,
                name: str = "vectors") -> np.ndarray:
    """Float32 [N, D] vectors as the index sees them: normalised for cosine."""
    x = _as_float32(x, name)
    return l2_normalize(x) if similarity.normalized else x


def _check_ids(ids: np.ndarray | torch.Tensor, count: int) -> np.ndarray:
    """[N] int64 item ids: one per vector, unique, >= 0 (-1 is the padding id)."""
    ids = ids.detach().cpu().numpy() if torch.is_tensor(ids) else np.asarray(ids)
    if ids.shape != (count,) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids has shape {ids.shape} and dtype {ids.dtype}; expected [{count}] "
                         "integers, one per embedding row")
    if count and ids.min() < 0:
        raise ValueError(f"ids must be >= 0 ({PAD_ID} marks padding); got {ids.min()}")
    if len(np.unique(ids)) != count:
        raise ValueError(f"ids has {count - len(np.unique(ids))} duplicate(s); the id map "
                         "needs one row per item")
    return ids.astype(np.int64)


def _drop_excluded(
    scores: np.ndarray, ids: np.ndarray, exclude: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's excluded ids, keep order, cut or pad to ``k`` columns.

    Args:
        scores: [Q, k'] float32, best first.
        ids: [Q, k'] int64 item ids (-1 = none).
        exclude: Q arrays of item ids to remove.
        k: columns to return.

    Returns:
        ``(scores [Q, k], ids [Q, k])``.
    """
    out_scores = np.full((len(ids), k), -np.inf, dtype=np.float32)
    out_ids = np.full((len(ids), k), PAD_ID, dtype=np.int64)
    for i, (row_scores, row_ids) in enumerate(zip(scores, ids, strict=True)):
        keep = (row_ids != PAD_ID) & ~np.isin(row_ids, exclude[i])
        n = min(k, int(keep.sum()))
        out_scores[i, :n], out_ids[i, :n] = row_scores[keep][:n], row_ids[keep][:n]
    return out_scores, out_ids


class TopK:
    """Top-k search over a fixed set of item vectors; subclasses implement ``_search_rows``.

    Args:
        ids: [N] int64 item id of each vector row.
        similarity: dot or cosine.
        dim: vector width D.
    """

    kind: str = ""

    def __init__(self, ids: np.ndarray, similarity: Similarity, dim: int):
        self.ids = ids
        self.similarity = Similarity(similarity)
        self.dim = dim

    @property
    def count(self) -> int:
        """Number of indexed items N."""
        return len(self.ids)

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k] float32, rows [Q, k] int64, -1 = none)`` for prepared queries."""
        raise NotImplementedError

    def _metadata(self) -> dict:
        """The ``topk.json`` content."""
        raise NotImplementedError

    def _save_index(self, directory: Path) -> None:
        """Write the index file(s) beside ``ids.npy``."""
        raise NotImplementedError

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        exclude: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items per query, excluded ids removed.

        Args:
            queries: [Q, D] float32 numpy or torch (normalised here for cosine).
            k: results per query, >= 1 (more than N is padded).
            exclude: Q arrays of item ids never to return for that query.

        Returns:
            ``(scores [Q, k] float32, ids [Q, k] int64)``, best first, padded with
            ``-inf`` / ``-1``.
        """
        q = as_searched(queries, self.similarity, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}; the index holds dim {self.dim}")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if exclude is not None and len(exclude) != len(q):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(q)} queries")
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        k_search = min(k + extra, self.count)
        scores, rows = self._search_rows(q, k_search) if k_search else (
            np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64))
        ids = np.where(rows >= 0, self.ids[np.maximum(rows, 0)], PAD_ID)
        scores = np.where(rows >= 0, scores, -np.inf).astype(np.float32)
        return _drop_excluded(scores, ids, exclude or [np.empty(0, np.int64)] * len(q), k)

    def save(self, directory: str | Path) -> None:
        """Write ``topk.json``, ``ids.npy`` and the index into ``directory`` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / IDS_FILE, self.ids, allow_pickle=False)
        self._save_index(directory)
        (directory / TOPK_JSON).write_text(json.dumps(self._metadata(), indent=2))


class ExactTopK(TopK):
    """Brute force in torch, chunked over queries; ties go to the lower row (deterministic).

    A full stable sort per query (O(N log N)): this is the oracle and the recall baseline,
    not the serving path for large catalogues.

    Args:
        embeddings: [N, D] item vectors (normalised here for cosine).
        ids: [N] item ids.
        similarity: dot or cosine.
    """

    kind = EXACT

    def __init__(self, embeddings, ids, similarity: Similarity | str):
        similarity = Similarity(similarity)
        vectors = as_searched(embeddings, similarity, "embeddings")
        super().__init__(_check_ids(ids, len(vectors)), similarity, vectors.shape[1])
        self.vectors = torch.from_numpy(vectors)  # [N, D], as searched

    @classmethod
    def _from_vectors(cls, vectors: np.ndarray, ids: np.ndarray, meta: dict) -> ExactTopK:
        """Wrap stored vectors as they are: normalising again could move the last bit."""
        self = cls.__new__(cls)
        TopK.__init__(self, ids, Similarity(meta["similarity"]), int(meta["dim"]))
        self.vectors = torch.from_numpy(vectors)
        return self

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = [], []
        chunk = max(1, EXACT_CHUNK_ELEMENTS // self.count)
        for q in torch.from_numpy(queries).split(chunk):
            s = q @ self.vectors.T  # [chunk, N]
            # a stable descending sort keeps equal scores in row order: lower row first
            best, order = torch.sort(s, dim=1, descending=True, stable=True)
            scores.append(best[:, :k])
            rows.append(order[:, :k])
        return torch.cat(scores).numpy(), torch.cat(rows).numpy().astype(np.int64)

    def _metadata(self) -> dict:
        return {"kind": EXACT, "factory": EXACT, "similarity": self.similarity.value,
                "dim": self.dim, "count": self.count, "params": {}}

    def _save_index(self, directory: Path) -> None:
        np.save(directory / EMBEDDINGS_FILE, self.vectors.numpy(), allow_pickle=False)


def _training_points_needed(index: faiss.Index) -> int:
    """Fewest vectors an index's k-means (IVF coarse quantizer, PQ codebooks) accepts."""
    needed = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needed = max(needed, ivf.nlist)
    pq = getattr(faiss.downcast_index(index), "pq", None)
    if pq is not None:
        needed = max(needed, pq.ksub)
    return needed


def _apply_params(index: faiss.Index, params: dict, factory: str) -> None:
    """Set index parameters (nprobe, efSearch, efConstruction, ...) by faiss name."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        try:
            space.set_index_parameter(index, name, float(value))
        except RuntimeError as err:
            raise ValueError(f"index parameter {name}={value!r} does not apply to factory "
                             f"{factory!r} (e.g. nprobe is for IVF, efSearch for HNSW)") from err


def _new_index(factory: str, dim: int) -> faiss.Index:
    """An empty inner-product index from a faiss index-factory string."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"factory {factory!r} is not a faiss index-factory string (e.g. "
                         f"'Flat', 'HNSW32', 'IVF64,Flat', 'IVF64,PQ8') or '{EXACT}'") from err


class FaissTopK(TopK):
    """A faiss index (inner-product metric) from an index-factory string; rows map to ids.

    Args:
        embeddings: [N, D] item vectors (normalised here for cosine).
        ids: [N] item ids.
        similarity: dot or cosine.
        factory: faiss index-factory string, e.g. "Flat", "HNSW32", "IVF64,Flat", "IVF64,PQ8".
        params: faiss parameters by name, e.g. {"nprobe": 8} or {"efSearch": 64}; applied
            before training and adding (so efConstruction works) and again on load.
    """

    kind = "faiss"

    def __init__(self, embeddings, ids, similarity: Similarity | str, factory: str,
                 params: dict | None = None):
        similarity = Similarity(similarity)
        vectors = as_searched(embeddings, similarity, "embeddings")
        super().__init__(_check_ids(ids, len(vectors)), similarity, vectors.shape[1])
        self.factory, self.params = factory, dict(params or {})
        self.index = _new_index(factory, self.dim)
        _apply_params(self.index, self.params, factory)
        self._train(vectors)
        self.index.add(vectors)

    def _train(self, vectors: np.ndarray) -> None:
        if self.index.is_trained:
            return
        needed = _training_points_needed(self.index)
        if len(vectors) < needed:
            raise ValueError(f"factory {self.factory!r} needs at least {needed} vectors to "
                             f"train; got {len(vectors)}. Use a smaller nlist (at most "
                             f"{max(1, len(vectors) // MIN_POINTS_PER_CENTROID)} for "
                             f"{len(vectors)} vectors), fewer PQ bits, or 'Flat'")
        self.index.train(vectors)

    @classmethod
    def _from_index(cls, index: faiss.Index, ids: np.ndarray, meta: dict) -> FaissTopK:
        """Wrap a loaded index without retraining or re-adding."""
        self = cls.__new__(cls)
        TopK.__init__(self, ids, Similarity(meta["similarity"]), int(meta["dim"]))
        self.factory, self.params, self.index = meta["factory"], dict(meta["params"]), index
        _apply_params(index, self.params, self.factory)
        return self

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(queries, k)
        return scores, rows.astype(np.int64)

    def _metadata(self) -> dict:
        return {"kind": self.kind, "factory": self.factory, "similarity": self.similarity.value,
                "dim": self.dim, "count": self.count, "params": self.params}

    def _save_index(self, directory: Path) -> None:
        faiss.write_index(self.index, str(directory / INDEX_FILE))


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


def load_topk(directory: str | Path) -> TopK:
    """Read a :class:`TopK` written by ``save``; its searches give identical results.

    Args:
        directory: folder holding ``topk.json``, ``ids.npy`` and the index file.

    Returns:
        An :class:`ExactTopK` or :class:`FaissTopK`.
    """
    directory = Path(directory)
    meta = json.loads((directory / TOPK_JSON).read_text())
    ids = np.load(directory / IDS_FILE, allow_pickle=False)
    if len(ids) != meta["count"]:
        raise ValueError(f"{directory / IDS_FILE} holds {len(ids)} ids; {TOPK_JSON} says "
                         f"count={meta['count']}")
    if meta["kind"] == EXACT:
        vectors = np.load(directory / EMBEDDINGS_FILE, allow_pickle=False)
        return ExactTopK._from_vectors(vectors, ids, meta)
    if meta["kind"] == FaissTopK.kind:
        return FaissTopK._from_index(faiss.read_index(str(directory / INDEX_FILE)), ids, meta)
    raise ValueError(f"{directory / TOPK_JSON} has kind {meta['kind']!r}; expected "
                     f"'{EXACT}' or '{FaissTopK.kind}'")
