"""FAISS behind the top-k interface: factory strings, training, selectors, search effort."""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from indexing.topk.base import WIDEN_MAX, TopK, TopKMeta
from indexing.topk.exact import EXACT
from indexing.topk.kernels import _check_ids, _dense_top, _distinct_rows, as_searched
from pipeline.config.model import Similarity

INDEX_FILE = "index.faiss"


FLAT_MAX_ITEMS = 50_000


DENSE_MAX_ITEMS = FLAT_MAX_ITEMS  # Flat indexes up to this size: scored and masked in numpy
# Allow-lists up to this size, or up to this fraction of the catalogue, are ranked exactly
# by brute force (docs/serving.md, "Filters and the index", has the measurements).
BRUTE_FORCE_MAX = 8192
BRUTE_FORCE_FRACTION = 0.25


MIN_POINTS_PER_CENTROID = 39  # below this faiss warns that k-means is under-trained


# The most search effort index.target_recall may ask of an ANN index: efSearch of HNSW, and
# this fraction of an IVF index's lists (docs/serving.md, "Filters and the index").
EF_SEARCH_MAX = 1024
NPROBE_MAX_FRACTION = 1 / 8


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


def _stored_vectors(index: faiss.Index) -> np.ndarray | None:
    """[N, D] view of the raw vectors a Flat or HNSW-Flat index holds, else None."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        index = faiss.downcast_index(index.storage)
    if not isinstance(index, faiss.IndexFlat):
        return None
    flat = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d)
    return flat.reshape(index.ntotal, index.d)


def _search_params(index: faiss.Index, selector: faiss.IDSelector
                   ) -> faiss.SearchParameters | None:
    """Search parameters carrying ``selector`` and the index's own efSearch / nprobe.

    A fresh ``SearchParametersHNSW`` / ``SearchParametersIVF`` would search with faiss's
    defaults (efSearch 16, nprobe 1), so the index's settings are copied in. None for an
    index type that takes no selector.
    """
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(sel=selector, efSearch=index.hnsw.efSearch)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf is index:
        return faiss.SearchParametersIVF(sel=selector, nprobe=ivf.nprobe,
                                         max_codes=ivf.max_codes)
    if isinstance(index, faiss.IndexFlat):
        return faiss.SearchParameters(sel=selector)
    return None


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
    def _from_index(cls, index: faiss.Index, ids: np.ndarray, meta: TopKMeta) -> FaissTopK:
        """Wrap a loaded index without retraining or re-adding."""
        self = cls.__new__(cls)
        TopK.__init__(self, ids, meta.similarity, meta.dim)
        self.factory, self.params, self.index = meta.factory, dict(meta.params), index
        _apply_params(index, self.params, self.factory)
        self._dense_vectors()  # at load, not on the first request (50,000 x 64: 23-42 ms)
        return self

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = self.index.search(queries, k)
        return scores, rows.astype(np.int64)

    def _search_excluding(self, queries: np.ndarray, k: int, owner: np.ndarray,
                          banned: np.ndarray, longest: int) -> tuple[np.ndarray, np.ndarray]:
        """A Flat index: every score in one product, exclusions masked per query.

        What faiss's Flat search computes anyway, without its per-call overhead, the
        widened search and the mask after it. Up to ``DENSE_MAX_ITEMS`` items (larger Flat
        indexes use faiss's search). Identical rows are scored once and share that score
        (:func:`_distinct_rows`): a float32 matrix product rounds identical rows
        differently by where they fall in its blocks, which would break ties between equal
        items out of row order. Float32, not float64 products rounded down: the vectors are
        read from memory once per request, and a served request finds them out of cache;
        2,000 x 64 float64 took 160 us against 54 us in float32 with the caches flushed
        before each product (31 against 14 us warm; measured 2026-12-03).
        """
        dense = self._dense_vectors()
        if dense is None:
            return super()._search_excluding(queries, k, owner, banned, longest)
        vectors, inverse = dense
        scores = (vectors @ queries[0])[None] if len(queries) == 1 else queries @ vectors.T
        if inverse is not None:  # [Q, distinct rows] -> [Q, N]
            scores = scores.take(inverse, axis=1)
        return _dense_top(scores, owner, banned, k)

    def _dense_vectors(self) -> tuple[np.ndarray, np.ndarray | None] | None:
        """:func:`_distinct_rows` of a Flat index scored in numpy, else None.

        Made when a saved index loads (a server's load thread) or at the first search.
        """
        if self.__dict__.get("_dense") is None:
            index = faiss.downcast_index(self.index)
            self._dense = _distinct_rows(_stored_vectors(index)) \
                if isinstance(index, faiss.IndexFlat) and self.count <= DENSE_MAX_ITEMS \
                else False
        return self._dense or None

    def _widen_max(self) -> float:
        """Scored in numpy, exclusions are masked, not searched around: any number joins.

        On the demo run (2,000 items; 58 of the first 1,000 users have seen more than
        ``WIDEN_MAX`` items): such a user's ``/recommend`` search 159 -> 62 us, a batch of
        16 users 486 -> 291 us (``Retriever.recommend_encoded``, measured 2026-12-03).
        """
        return math.inf if self._dense_vectors() is not None else WIDEN_MAX

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """[R, D] vectors of ``rows`` as the index holds them (IVF-PQ: reconstructions)."""
        stored = _stored_vectors(self.index)
        if stored is not None:  # Flat / HNSW-Flat: the index's own array
            return stored.take(rows, axis=0)
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()  # once: row -> list position, so rows can be read back
        return self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def _all_vectors(self) -> np.ndarray | None:
        return _stored_vectors(self.index)

    def _search_alone(self, query: np.ndarray, k: int, exclude: np.ndarray,
                      allow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if allow is not None and len(allow) <= max(BRUTE_FORCE_MAX,
                                                   BRUTE_FORCE_FRACTION * self.count):
            return self._brute_force(query, k, exclude, allow)
        selector, keep = self._selector(exclude, allow)
        params = _search_params(self.index, selector)
        if params is None:  # an index type faiss cannot filter: exact over the vectors
            return self._brute_force(query, k, exclude, allow)
        scores, rows = self.index.search(query[None], k, params=params)
        del keep  # the selector's arrays had to outlive the search
        qualifying = self.count - len(exclude) if allow is None else \
            len(allow) - int(np.isin(exclude, allow, assume_unique=True).sum())
        if (rows[0] >= 0).sum() < min(k, qualifying):  # a graph search that ran dry
            return self._brute_force(query, k, exclude, allow)
        rows = rows[0].astype(np.int64)
        return np.where(rows >= 0, scores[0], -np.inf).astype(np.float32), rows

    def _selector(self, exclude: np.ndarray, allow: np.ndarray | None
                  ) -> tuple[faiss.IDSelector, list]:
        """A faiss selector of the qualifying rows, and the objects it points into."""
        if allow is None:  # everything but a hash set of the excluded rows
            banned = np.ascontiguousarray(exclude, dtype=np.int64)
            batch = faiss.IDSelectorBatch(len(banned), faiss.swig_ptr(banned))
            return faiss.IDSelectorNot(batch), [banned, batch]
        mask = np.zeros(self.count, dtype=bool)
        mask[allow] = True
        mask[exclude] = False
        bits = np.packbits(mask, bitorder="little")  # faiss reads bit i & 7 of byte i >> 3
        return faiss.IDSelectorBitmap(self.count, faiss.swig_ptr(bits)), [bits]

    def search_effort(self) -> tuple[str, int, int] | None:
        """The search effort of an HNSW or IVF index, else None.

        HNSW: efSearch, up to ``EF_SEARCH_MAX``; IVF: nprobe, up to ``NPROBE_MAX_FRACTION``
        of its lists (never below the value set).
        """
        index = faiss.downcast_index(self.index)
        if isinstance(index, faiss.IndexHNSW):
            value = int(index.hnsw.efSearch)
            return "efSearch", value, max(value, EF_SEARCH_MAX)
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            value = int(ivf.nprobe)
            return "nprobe", value, max(value, int(ivf.nlist * NPROBE_MAX_FRACTION))
        return None

    def set_params(self, params: dict) -> None:
        """Change search parameters (kept in ``params``, so saved with the index)."""
        _apply_params(self.index, params, self.factory)
        self.params.update(params)

    @property
    def meta(self) -> TopKMeta:  # noqa: D102
        return TopKMeta(kind=self.kind, factory=self.factory, similarity=self.similarity,
                        dim=self.dim, count=self.count, params=self.params)

    def _save_index(self, directory: Path) -> None:
        faiss.write_index(self.index, str(directory / INDEX_FILE))
