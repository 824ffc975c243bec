"""The top-k interface: the id map, per-query exclusions and allow-lists, save.

Subclasses (``exact.py``, ``faiss_index.py``) implement the row search; this class plans
each query (searched together with its neighbours, alone through the index, or by brute
force over its allowed rows) and maps rows to the caller's ids. The thresholds are chosen
from measurements on ``docs/serving.md`` ("Filters and the index").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from indexing.topk.kernels import (
    PAD_ID,
    _best_of,
    _masked_top,
    as_searched,
)
from pipeline.config.model import Similarity
from pipeline.strict import StrictModel
from pipeline.transforms import distinct

IDS_FILE = "ids.npy"


class TopKMeta(StrictModel):
    """What loads a saved index: the one metadata record an index has.

    The run directory keeps it in ``index/manifest.json`` (``indexing.build``), beside the
    model and catalogue it was built for; ``load_topk(directory, meta)`` reads the files.
    """

    kind: str = Field(description="'exact' (stored vectors) or 'faiss'.")
    factory: str = Field(description="The FAISS factory string, or 'exact'.")
    similarity: Similarity = Field(description="dot or cosine (cosine: L2-normalised, "
                                   "then inner product; both search by inner product).")
    dim: int = Field(ge=1, description="Vector width D.")
    count: int = Field(ge=0, description="Items indexed N (rows of ids.npy).")
    params: dict[str, int] = Field(default_factory=dict,
                                   description="Search parameters (nprobe, efSearch).")


WIDEN_MAX = 64  # longer exclusion lists are searched alone, with a selector
# Brute force over more rows than this fraction of the catalogue scores every stored vector
# and picks the rows' scores (docs/serving.md, "Filters and the index").
SCORE_ALL_FRACTION = 0.1


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

    @property
    def meta(self) -> TopKMeta:
        """What :func:`~indexing.topk.store.load_topk` needs besides the saved files."""
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

    def save(self, directory: str | Path) -> TopKMeta:
        """Write ``ids.npy`` and the index into ``directory`` (created).

        Returns:
            The index's metadata, for the caller's one record of it (``load_topk`` needs it).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / IDS_FILE, self.ids, allow_pickle=False)
        self._save_index(directory)
        return self.meta
