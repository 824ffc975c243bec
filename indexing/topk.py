"""Top-k retrieval over item embeddings: an exact oracle and FAISS behind one interface.

``TopK.search(queries, k, exclude, allow)`` returns ``(scores [Q, k] float32, ids [Q, k]
int64)`` with the caller's item ids (from the id map), best first. Fewer than ``k`` results
(``k`` larger than the catalogue or than the allowed items, an ANN index that found fewer)
are padded with id ``-1`` and score ``-inf``.

Exclusions and allow-lists apply per query, so one long list never widens its neighbours'
search: queries with at most ``WIDEN_MAX`` exclusions and no allow-list are searched
together, with ``k`` + their longest exclusion list and masked in one vectorised step (a
Flat index up to ``DENSE_MAX_ITEMS``: every score in one product, the excluded pairs set
to -inf, so no exclusion list is too long to join them); each other query is searched
alone, by brute force over its allowed items when they are at most ``BRUTE_FORCE_MAX`` or
``BRUTE_FORCE_FRACTION`` of the catalogue (exact), else through the index with a faiss
``IDSelector`` (a bitmap of the allowed items, a hash set of the excluded ones), falling
back to brute force when a graph search under a selective filter returns fewer than ``k``
of the items that qualify.

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
from pipeline.transforms import distinct

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
WIDEN_MAX = 64  # longer exclusion lists are searched alone, with a selector
DENSE_MAX_ITEMS = FLAT_MAX_ITEMS  # Flat indexes up to this size: scored and masked in numpy
BRUTE_FORCE_MAX = 8192  # allow-lists up to this size are ranked exactly by brute force,
# and so are those up to this fraction of the catalogue: at 10^6 items of dim 32, one thread,
# gathering and scoring 81,512 allowed rows took 11 ms and 244,457 rows 20 ms, where HNSW32
# under a bitmap of the same rows answered in 30 and 93 ms (p50, benchmarks.serve_latency);
# scoring all 10^6 rows and masking took 15-22 ms whatever the list.
BRUTE_FORCE_FRACTION = 0.25
# The most search effort index.target_recall may ask of an ANN index: efSearch 1,024 of HNSW
# (3.2 ms a query at 10^6 items of dim 32 on one thread, about half of scoring every item)
# and an eighth of an IVF index's lists (0.90 recall@100 on the same items at IVF1024 with
# nprobe 128, 1.8 ms; measured 2026-12-03).
EF_SEARCH_MAX = 1024
NPROBE_MAX_FRACTION = 1 / 8
# Brute force over more rows than this fraction of the catalogue scores every stored vector
# and picks the rows' scores: at 10^6 items of dim 32 (one thread) one product over all
# took 7.3 ms whatever the list, gathering 81,512 rows and scoring them 5.7 ms, 244,457
# rows 9.8 ms (measured 2026-12-02).
SCORE_ALL_FRACTION = 0.1


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero).

    Args:
        x: [N, D] float32.

    Returns:
        [N, D] float32.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # one call: cheaper per request
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


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
    duplicates = count - len(distinct(ids))
    if duplicates:
        raise ValueError(f"ids has {duplicates} duplicate(s); the id map "
                         "needs one row per item")
    return ids.astype(np.int64)


def _masked_top(scores: np.ndarray, rows: np.ndarray, owner: np.ndarray, banned: np.ndarray,
                k: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop each query's excluded rows, keep order, cut or pad to ``k`` columns (no loop).

    Args:
        scores: [Q, k'] float32, best first.
        rows: [Q, k'] int64 index rows (-1 = none).
        owner: [E] int64 query of each excluded row, ascending.
        banned: [E] int64 excluded rows (duplicates allowed).
        k: columns to return.
        count: rows in the index (every row and banned row is below it).

    Returns:
        ``(scores [Q, k], rows [Q, k])`` padded with ``-inf`` / ``-1``.
    """
    q = rows.shape[0]
    keep = rows >= 0
    if len(banned):  # (query, row) pairs as one sorted key; -1 rows key below any pair
        span = count + 1
        keys = owner * span + banned
        keys.sort()
        keyed = rows + (np.arange(q, dtype=np.int64) * span)[:, None]  # [Q, k']
        keep &= keys.take(np.searchsorted(keys, keyed), mode="clip") != keyed
    column = np.cumsum(keep, axis=1)  # 1 + where each kept entry lands
    keep &= column <= k
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    out_rows = np.full((q, k), PAD_ID, dtype=np.int64)
    at = np.nonzero(keep)
    to = (at[0], column[at] - 1)
    out_scores[to] = scores[at]
    out_rows[to] = rows[at]
    return out_scores, out_rows


def _dense_top(scores: np.ndarray, owner: np.ndarray, banned: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of every query's full score row, its excluded rows masked out.

    A handful of array calls whatever the batch size: the excluded (query, row) pairs are
    set to -inf in one assignment, ``argpartition`` finds each query's k best, a
    ``lexsort`` orders them; ties go to the lower row, as in :class:`ExactTopK` (a query
    whose k-th score is shared beyond the k-th place is re-ranked alone, stably).

    Args:
        scores: [Q, N] float32 scores of every row (overwritten).
        owner: [E] query of each excluded row.
        banned: [E] excluded rows.
        k: columns to return.

    Returns:
        ``(scores [Q, k], rows [Q, k])`` padded with ``-inf`` / ``-1``.
    """
    q, n = scores.shape
    if q == 1:  # one query (the serving case): the same rule over a 1-d row, fewer calls
        top, rows = _dense_top_one(scores[0], banned, k)
        return top[None], rows[None]
    scores[owner, banned] = -np.inf
    kept = min(k, n)
    at = np.arange(q)[:, None]
    if kept < n:  # the best of the rest in its place, the k best after it
        part = np.argpartition(scores, n - kept - 1, axis=1)
        best = part[:, n - kept:]
    else:
        best = np.tile(np.arange(n, dtype=np.intp), (q, 1))
    top = scores[at, best]
    if kept < n:  # equal scores across the k-th place: the lower rows win, as exact search
        floor = top.min(axis=1)  # the k-th best score
        crowded = scores[at[:, 0], part[:, n - kept - 1]] >= floor  # a row left out ties it
        if crowded.any():
            for i in np.flatnonzero(crowded & np.isfinite(floor)):  # rare: tied vectors
                best[i] = np.argsort(-scores[i], kind="stable")[:kept]
                top[i] = scores[i, best[i]]
    order = np.lexsort((best, -top))  # per query: best score first, then the lower row
    top, rows = top[at, order], best[at, order].astype(np.int64, copy=False)
    rows[top == -np.inf] = PAD_ID  # excluded, or fewer rows than k
    if kept == k:
        return top, rows
    out_scores = np.full((q, k), -np.inf, dtype=np.float32)
    out_rows = np.full((q, k), PAD_ID, dtype=np.int64)
    out_scores[:, :kept], out_rows[:, :kept] = top, rows
    return out_scores, out_rows


def _dense_top_one(scores: np.ndarray, banned: np.ndarray, k: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_dense_top` of one query's score row [N] (overwritten): ``([k], [k])``.

    The same result in about half the time of the 2-d calls (a one-query search of the
    demo run's 2,000 items: 64 -> 36 us, measured 2026-12-03). One partition point, not
    two (the k-th best is the least of the k): on the demo run's scores ``argpartition``
    at two points took 33 us against 8 us at one (numpy 2.4, 2026-12-03).
    """
    n = len(scores)
    scores[banned] = -np.inf
    kept = min(k, n)
    if kept < n:
        part = np.argpartition(scores, n - kept - 1)
        best = part[n - kept:]
        top = scores[best]
        floor = top.min()
        if scores[part[n - kept - 1]] >= floor and np.isfinite(floor):  # a tie left out
            best = np.argsort(-scores, kind="stable")[:kept]
            top = scores[best]
    else:
        best = np.arange(n, dtype=np.intp)
        top = scores
    order = np.lexsort((best, -top))
    top, rows = top[order], best[order].astype(np.int64, copy=False)
    rows[top == -np.inf] = PAD_ID
    if kept == k:
        return top, rows
    out_scores = np.full(k, -np.inf, dtype=np.float32)
    out_rows = np.full(k, PAD_ID, dtype=np.int64)
    out_scores[:kept], out_rows[:kept] = top, rows
    return out_scores, out_rows


def _distinct_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(distinct rows [M, D], inverse [N])`` with ``distinct[inverse] == vectors``.

    ``(vectors, None)`` when every row is distinct (the usual case: no gather at search).
    Rows compare by their bytes.
    """
    rows = np.ascontiguousarray(vectors, dtype=np.float32)
    keys = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if len(first) == len(rows):
        return rows, None
    return rows[first], inverse.reshape(-1).astype(np.intp)


def _best_of(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of candidate ``rows`` [C] (ascending) by ``scores`` [C], padded.

    Ties go to the lower row, as in :class:`ExactTopK`. Returns ``([k], [k])``.
    """
    out_scores = np.full(k, -np.inf, dtype=np.float32)
    out_rows = np.full(k, PAD_ID, dtype=np.int64)
    if len(rows) > k:  # the k-th best score, then a stable sort of everything at or above it
        kth = np.partition(scores, len(rows) - k)[len(rows) - k]
        keep = np.flatnonzero(scores >= kth)
        rows, scores = rows[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[:k]
    out_scores[:len(order)], out_rows[:len(order)] = scores[order], rows[order]
    return out_scores, out_rows


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
        self.params: dict = {}  # faiss parameters by name, as saved

    def search_effort(self) -> tuple[str, int, int] | None:
        """(parameter, its value, the most it may be raised to) trading speed for recall.

        None for an index searched exactly (exact, Flat) or with no such parameter.
        """
        return None

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

    def _identity_map(self) -> bool:
        """True when the id map is 0..N-1 itself (ids are rows); sorts the ids once if not."""
        if self.__dict__.get("_identity") is None:
            self._identity = bool(np.array_equal(self.ids, np.arange(self.count)))
            order = np.argsort(self.ids, kind="stable")
            self._id_order, self._sorted_ids = order, self.ids[order]
        return self._identity

    def _flat_rows(self, per_query: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        """Every query's item ids as index rows, flattened: ``(owner [E], rows [E])``.

        ``owner`` is each row's query (ascending); ids not indexed are dropped. One pass
        over all queries, whatever their number.
        """
        lengths = [0 if ids is None else len(ids) for ids in per_query]
        if not sum(lengths):
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        if len(per_query) == 1:  # one query (the serving case): no concatenation, no repeat
            flat = np.asarray(per_query[0], np.int64).ravel()
            owner = np.zeros(len(flat), np.int64)
        else:
            flat = np.concatenate([np.asarray(ids, np.int64).ravel()
                                   for ids in per_query if ids is not None])
            owner = np.repeat(np.arange(len(per_query), dtype=np.int64), lengths)
        if self._identity_map():
            found = (flat >= 0) & (flat < self.count)
            return (owner, flat) if found.all() else (owner[found], flat[found])
        at = np.minimum(np.searchsorted(self._sorted_ids, flat), max(self.count - 1, 0))
        found = self._sorted_ids[at] == flat if self.count else np.zeros(len(flat), bool)
        return owner[found], self._id_order[at[found]]

    def _rows_of(self, per_query: list[np.ndarray | None]) -> list[np.ndarray]:
        """Each query's item ids as index rows (ids not indexed are dropped)."""
        owner, rows = self._flat_rows(per_query)
        bounds = np.searchsorted(owner, np.arange(len(per_query) + 1))
        return [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """[R, D] float32 item vectors as searched (normalised for cosine), by index row."""
        raise NotImplementedError

    def _search_excluding(self, queries: np.ndarray, k: int, owner: np.ndarray,
                          banned: np.ndarray, longest: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` best rows of prepared queries, each without its few excluded rows.

        Searched ``k`` + ``longest`` deep (the longest exclusion list), then masked.

        Args:
            queries: [Q, D] as searched.
            k: columns to return.
            owner: [E] query of each excluded row, ascending.
            banned: [E] excluded rows.
            longest: the most excluded rows of one query.
        """
        width = min(k + longest, self.count)
        return _masked_top(*self._search_rows(queries, width), owner, banned, k, self.count)

    def _widen_max(self) -> float:
        """The most exclusions a query may have and still be searched with the others."""
        return WIDEN_MAX

    def _search_alone(self, query: np.ndarray, k: int, exclude: np.ndarray,
                      allow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One query [D] with its own exclusions and allow-list: brute force here."""
        return self._brute_force(query, k, exclude, allow)

    def _brute_force(self, query: np.ndarray, k: int, exclude: np.ndarray,
                     allow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of one query [D] over ``allow`` (or every row) minus ``exclude``."""
        rows = np.arange(self.count, dtype=np.int64) if allow is None else allow
        if len(exclude):
            rows = rows[~np.isin(rows, exclude, assume_unique=True)]
        every = self._all_vectors()
        if every is not None and len(rows) > SCORE_ALL_FRACTION * self.count:
            return _best_of((every @ query)[rows], rows, k)  # cheaper than gathering rows
        return _best_of(self.vectors(rows) @ query, rows, k)

    def _all_vectors(self) -> np.ndarray | None:
        """[N, D] every stored vector as searched, when the index holds them (else None)."""
        return None

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int,
        exclude: list[np.ndarray] | None = None,
        allow: list[np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best items per query, among its allowed items, its excluded ones removed.

        Args:
            queries: [Q, D] float32 numpy or torch (normalised here for cosine).
            k: results per query, >= 1 (more than N is padded).
            exclude: Q arrays of item ids never to return for that query.
            allow: Q entries, each None (every item) or an array of the only item ids that
                query may return (ids not in the index are ignored).

        Returns:
            ``(scores [Q, k] float32, ids [Q, k] int64)``, best first, padded with
            ``-inf`` / ``-1``.
        """
        q = as_searched(queries, self.similarity, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have dim {q.shape[1]}; the index holds dim {self.dim}")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        for name, per_query in (("exclude", exclude), ("allow", allow)):
            if per_query is not None and len(per_query) != len(q):
                raise ValueError(f"{name} has {len(per_query)} entries for {len(q)} queries")
        n = len(q)
        owner, banned = self._flat_rows(exclude) if exclude else (np.zeros(0, np.int64),) * 2
        lengths = np.bincount(owner, minlength=n)  # [Q] exclusions per query
        limited = [i for i, a in enumerate(allow or ()) if a is not None]
        longest, widen_max = int(lengths.max(initial=0)), self._widen_max()
        if longest <= widen_max and not limited:  # the serving case: one search, one mask
            scores, rows = self._search_excluding(q, k, owner, banned, longest)
        else:
            together = lengths <= widen_max
            together[limited] = False
            scores = np.full((n, k), -np.inf, dtype=np.float32)
            rows = np.full((n, k), PAD_ID, dtype=np.int64)
            at = np.flatnonzero(together)
            if len(at):
                mine = together[owner]
                position = np.cumsum(together) - 1  # query -> its row among those searched
                scores[at], rows[at] = self._search_excluding(
                    q[at], k, position[owner[mine]], banned[mine], int(lengths[at].max()))
            allowed = dict(zip(limited, self._rows_of([allow[i] for i in limited]),
                               strict=True))
            bounds = np.searchsorted(owner, np.arange(n + 1))
            for i in np.flatnonzero(~together):  # long exclusions, allow-lists: one by one
                al = distinct(allowed[i]) if i in allowed else None
                scores[i], rows[i] = self._search_alone(
                    q[i], k, distinct(banned[bounds[i]:bounds[i + 1]]), al)
        ids = rows if self._identity_map() else \
            np.where(rows >= 0, self.ids[np.maximum(rows, 0)], PAD_ID)
        return scores, ids

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
        self.vectors_t = torch.from_numpy(vectors)  # [N, D], as searched

    @classmethod
    def _from_vectors(cls, vectors: np.ndarray, ids: np.ndarray, meta: dict) -> ExactTopK:
        """Wrap stored vectors as they are: normalising again could move the last bit."""
        self = cls.__new__(cls)
        TopK.__init__(self, ids, Similarity(meta["similarity"]), int(meta["dim"]))
        self.vectors_t = torch.from_numpy(vectors)
        return self

    def _search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, rows = [], []
        chunk = max(1, EXACT_CHUNK_ELEMENTS // self.count)
        for q in torch.from_numpy(queries).split(chunk):
            s = q @ self.vectors_t.T  # [chunk, N]
            # a stable descending sort keeps equal scores in row order: lower row first
            best, order = torch.sort(s, dim=1, descending=True, stable=True)
            scores.append(best[:, :k])
            rows.append(order[:, :k])
        return torch.cat(scores).numpy(), torch.cat(rows).numpy().astype(np.int64)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """[R, D] stored vectors of ``rows`` (a copy)."""
        return self.vectors_t.numpy().take(rows, axis=0)

    def _all_vectors(self) -> np.ndarray:
        return self.vectors_t.numpy()

    def _metadata(self) -> dict:
        return {"kind": EXACT, "factory": EXACT, "similarity": self.similarity.value,
                "dim": self.dim, "count": self.count, "params": {}}

    def _save_index(self, directory: Path) -> None:
        np.save(directory / EMBEDDINGS_FILE, self.vectors_t.numpy(), allow_pickle=False)


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
    def _from_index(cls, index: faiss.Index, ids: np.ndarray, meta: dict) -> FaissTopK:
        """Wrap a loaded index without retraining or re-adding."""
        self = cls.__new__(cls)
        TopK.__init__(self, ids, Similarity(meta["similarity"]), int(meta["dim"]))
        self.factory, self.params, self.index = meta["factory"], dict(meta["params"]), index
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

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: a file does not read as what ``save`` wrote (named, with the reason):
            a truncated or foreign ``index.faiss``, a ``topk.json`` without its keys.
    """
    directory = Path(directory)
    meta = _read_topk_json(directory / TOPK_JSON)
    ids = _read_npy(directory / IDS_FILE)
    if ids.ndim != 1 or len(ids) != meta["count"]:
        raise ValueError(f"{directory / IDS_FILE} holds {ids.shape} ids; {TOPK_JSON} says "
                         f"count={meta['count']}")
    if meta["kind"] == EXACT:
        vectors = _read_npy(directory / EMBEDDINGS_FILE)
        if vectors.shape != (meta["count"], meta["dim"]):
            raise ValueError(f"{directory / EMBEDDINGS_FILE} has shape {vectors.shape}; "
                             f"{TOPK_JSON} says ({meta['count']}, {meta['dim']})")
        return ExactTopK._from_vectors(vectors, ids, meta)
    if meta["kind"] == FaissTopK.kind:
        index = _read_faiss(directory / INDEX_FILE)
        if (index.ntotal, index.d) != (meta["count"], meta["dim"]):
            raise ValueError(f"{directory / INDEX_FILE} holds {index.ntotal} vectors of dim "
                             f"{index.d}; {TOPK_JSON} says {meta['count']} of dim {meta['dim']}")
        return FaissTopK._from_index(index, ids, meta)
    raise ValueError(f"{directory / TOPK_JSON} has kind {meta['kind']!r}; expected "
                     f"'{EXACT}' or '{FaissTopK.kind}'")


_TOPK_KEYS = ("kind", "factory", "similarity", "dim", "count", "params")


def _read_topk_json(path: Path) -> dict:
    """``topk.json`` with every key ``load_topk`` reads."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.build_index`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    missing = [key for key in _TOPK_KEYS if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{path} lacks {missing}; expected keys {list(_TOPK_KEYS)}")
    return meta


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
