"""The retrieval model of one run directory: user tower + index + catalogue (no Serve here).

:class:`Retriever` loads ``RUN_DIR/model`` (the user tower), ``RUN_DIR/index`` through
``indexing.build.load_index`` (which refuses an index built for another model), the
catalogue (``prepared/items.parquet``: row number = the index's id -> raw item id, checked
row for row against the index manifest's catalogue hash), the item embeddings of the
current model version (``embeddings/items/model_version=V``), every known user's encoded
row (``prepared/users.parquet``) and, when the index build wrote them, their embeddings
(``embeddings/users/model_version=V``: a known user sent without overrides needs no tower
forward), the per-run request contract and the attribute index of the catalogue. Every
read is checked at this edge: a run that does not load raises ``FileNotFoundError`` or
``ValueError`` naming the file (and the field or column).

Every public method takes a LIST of requests: the Serve deployment batches concurrent
requests into one user-tower forward and one index search. Each method is also split in
two halves, ``encode_*`` (one request, raises a :class:`~serve_app.schemas.RequestError`
naming the field) and ``*_encoded`` (the batched forward and search, returning
:class:`Answer` lists that render straight to JSON), so a bad request is rejected before it
joins a batch and cannot fail its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pydantic_core

from indexing.batches import to_tensors
from indexing.build import check_catalogue, load_index
from indexing.embed import read_embeddings
from indexing.topk import as_searched
from pipeline.columns import ITEM, SEEN, USER, tower_inputs
from pipeline.rows import id_feature_names
from pipeline.run_dir import RunDir, load_fitted, read_model_meta, read_table
from pipeline.transforms import distinct
from serve_app.contract import RunContract, filterable
from serve_app.encode import EncodedUser, RequestEncoder
from serve_app.filters import AttributeIndex
from serve_app.schemas import (
    IndexSummary,
    RawId,
    RecommendResponse,
    ScoredItem,
    ScoreResponse,
    SimilarItemsResponse,
    VersionResponse,
)
from towers.exported import ExportedTower


@dataclass(frozen=True)
class Restriction:
    """What one request may return: rows left out, and the only rows allowed (or None)."""

    exclude: np.ndarray  # [E] int64 catalogue rows
    allow: np.ndarray | None  # [A] sorted int64 catalogue rows; None: the whole catalogue


@dataclass(frozen=True)
class RecommendQuery:
    """An encoded ``/recommend`` request: the user, k and what it may return."""

    user: EncodedUser
    k: int
    rows: Restriction


@dataclass(frozen=True)
class ScoreQuery:
    """An encoded ``/score`` request: the user and the catalogue rows of its items."""

    user: EncodedUser
    item_ids: list[RawId]
    rows: np.ndarray  # [N] int64 catalogue rows, in request order


@dataclass(frozen=True)
class SimilarQuery:
    """An encoded ``/similar-items`` request."""

    row: int  # catalogue row of the query item
    k: int
    rows: Restriction


@dataclass(frozen=True)
class Answer:
    """One answer: raw item ids and their scores, best first, and the model that gave it.

    ``key`` names the list in the JSON body (``items`` or ``scores``).
    """

    item_ids: list[RawId]
    scores: list[float]
    model_version: str
    key: str = "items"

    def to_json(self) -> bytes:
        """The response body, rendered without a model.

        pydantic-core's serializer: a quarter of ``json.dumps``'s time on a 10-item answer.
        """
        entries = [{"item_id": i, "score": s}
                   for i, s in zip(self.item_ids, self.scores, strict=True)]
        return pydantic_core.to_json({self.key: entries, "model_version": self.model_version})

    def to_model(self, cls: type) -> Any:
        """The answer as ``cls`` (a response model of :mod:`serve_app.schemas`)."""
        entries = [ScoredItem(item_id=i, score=s)
                   for i, s in zip(self.item_ids, self.scores, strict=True)]
        return cls(**{self.key: entries, "model_version": self.model_version})


def item_embeddings(run: RunDir, model_version: str, key: str, count: int) -> np.ndarray:
    """[I, D] item embeddings in catalogue order, written by the index build for this model.

    Raises:
        FileNotFoundError: ``embeddings/items/model_version=V`` is missing.
        ValueError: it does not hold one row per catalogue item.
    """
    folder = run.embeddings(ITEM, model_version)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} is missing: run `python -m jobs.build_index` for "
                                f"model {model_version}")
    _, rows, emb = read_embeddings(folder, key)
    if not np.array_equal(rows, np.arange(count)):
        raise ValueError(f"{folder} holds {len(rows)} rows, not one per catalogue item "
                         f"({count}): rebuild the index with jobs.build_index")
    return emb


def stored_user_embeddings(run: RunDir, model_version: str, key: str, count: int
                           ) -> np.ndarray | None:
    """[U, D] user embeddings the index build wrote for this model, by users.parquet row.

    None when the folder is missing (the tower then runs for every request).

    Raises:
        ValueError: the folder does not hold one row per user of ``users.parquet``.
    """
    folder = run.embeddings(USER, model_version)
    if not folder.exists():
        return None
    _, rows, emb = read_embeddings(folder, key)
    if not np.array_equal(rows, np.arange(count)):
        raise ValueError(f"{folder} holds {len(rows)} rows, not one per user of "
                         f"{run.table(USER)} ({count}): rebuild the index with jobs.build_index")
    return emb


def require_columns(table: pa.Table, path: Path, columns: list[str], what: str) -> None:
    """Raise ValueError naming ``path`` and the first of ``columns`` it lacks."""
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{path} has no column {missing[0]!r} ({what}); re-run "
                         f"jobs.prepare. Columns: {table.column_names[:20]}")


class Retriever:
    """Everything needed to answer requests for one trained run.

    Args:
        run_dir: a run directory with ``model/`` (meta and the exported user tower),
            ``index/``, ``embeddings/items/`` and ``prepared/``.
        serve_config: the deployment's serve config (the request contract's bounds);
            default: the run's own ``serve`` section.

    Raises:
        FileNotFoundError: a part of the run directory is missing (names the file).
        ValueError: a file does not read, or the index, the feature state, the exported
            tower or the catalogue do not belong to the model (names the file or field).
    """

    def __init__(self, run_dir: str | Path, serve_config: Any = None):
        run = RunDir(Path(run_dir).resolve())
        self.run_dir = run.root
        meta = read_model_meta(run.model)
        fitted = load_fitted(run, meta)
        self.model_version: str = meta.model_version
        self.feature_state_hash: str = meta.feature_state_hash
        self.similarity = meta.config.model.similarity
        self.user_tower = ExportedTower(run.exported_tower(USER))
        exported_version = self.user_tower.spec.get("metadata", {}).get("model_version")
        if exported_version != self.model_version:
            raise ValueError(f"{self.user_tower.path} was exported from model "
                             f"{exported_version}, but model/meta.json is {self.model_version}: "
                             "re-run jobs.train")
        self.index, self.manifest = load_index(run, meta)
        catalogue, users = read_table(run, ITEM), read_table(run, USER)
        require_columns(catalogue, run.table(ITEM), [fitted.item_id], "the item key")
        check_catalogue(self.manifest, run, catalogue[fitted.item_id])
        require_columns(users, run.table(USER), [fitted.user_id, SEEN], "key / seen items")
        self.encoder = RequestEncoder(fitted, users, catalogue)
        self.item_ids: list[RawId] = catalogue[fitted.item_id].to_pylist()  # row -> raw id
        vectors = item_embeddings(run, self.model_version, fitted.item_id, catalogue.num_rows)
        self.item_vectors = as_searched(vectors, self.similarity)  # [I, D]
        cfg = serve_config or meta.config.serve
        self.user_vectors = stored_user_embeddings(run, self.model_version, fitted.user_id,
                                                   users.num_rows) \
            if cfg.stored_user_embeddings else None  # [U, D] or None
        attributes = filterable(fitted.item, id_feature_names(fitted.item, fitted.item_id))
        self.attributes = AttributeIndex(catalogue, attributes)
        sources = {src: [fitted.user.features[n] for n in names]
                   for src, names in self.encoder.sources.items()}
        self.contract = RunContract.build(sources, attributes, cfg)

    def info(self) -> VersionResponse:
        """What this retriever serves (``GET /version``; no paths)."""
        m = self.manifest
        summary = IndexSummary(index_type=m.index_type, similarity=m.similarity.value,
                               dim=m.dim, item_count=m.item_count, params=m.params,
                               recall=m.recall.model_dump())
        return VersionResponse(model_version=self.model_version,
                               feature_state_hash=self.feature_state_hash, index=summary)

    # -- one request -> its encoded form (raises RequestError naming the field) ----------

    def encode_user(self, request: Any) -> EncodedUser:
        """The user part of a request, its ``features`` checked against the run first."""
        if request.features:
            self.contract.check_features(request.features)
        return self.encoder.encode(request)

    def restriction(self, request: Any, exclude: list[np.ndarray]) -> Restriction:
        """The rows a request may not return (``exclude`` + exclude_items) and may return."""
        if request.filter:
            self.contract.check_filter(request.filter)
        if request.exclude_items or len(exclude) != 1:
            rows = self.encoder.item_rows(request.exclude_items)
            excluded = distinct(np.concatenate([*exclude, rows[rows >= 0],
                                                np.zeros(0, np.int64)])).astype(np.int64)
        else:  # the usual request: the seen rows, already sorted and distinct
            excluded = exclude[0]
        allow = None
        if request.allow_items is not None:
            rows = self.encoder.item_rows(request.allow_items)
            allow = distinct(rows[rows >= 0])
        return Restriction(excluded, self.attributes.rows(request.filter, allow))

    def encode_recommend(self, request: Any) -> RecommendQuery:
        """Encode the user and collect the rows it may return (seen items, exclusions)."""
        user = self.encode_user(request)
        seen = [user.seen] if request.exclude_seen else []
        return RecommendQuery(user, request.k, self.restriction(request, seen))

    def encode_score(self, request: Any) -> ScoreQuery:
        """Encode the user; every item id must be in the catalogue."""
        rows = self.encoder.known_item_rows(request.item_ids, "item_ids")
        return ScoreQuery(self.encode_user(request), list(request.item_ids), rows)

    def encode_similar(self, request: Any) -> SimilarQuery:
        """The query item's catalogue row (an unknown id is an error) and restrictions."""
        row = int(self.encoder.known_item_rows([request.item_id], "item_id")[0])
        return SimilarQuery(row, request.k,
                            self.restriction(request, [np.array([row], np.int64)]))

    # -- a batch of encoded requests -> answers (one forward, one search) ----------------

    def embed_users(self, users: list[EncodedUser]) -> np.ndarray:
        """[B, D] float32 user embeddings: stored ones, one tower forward for the rest.

        A known user sent without overrides has the embedding the index build wrote for
        its row (the same tower on the same row, computed once); every other request runs
        the exported tower, all of them in one forward.
        """
        stored = self.user_vectors is not None
        rows = np.array([u.stored_row if stored else -1 for u in users], np.int64)
        known = rows >= 0
        if known.all():  # every one stored (the common case): one gather
            return self.user_vectors[rows]
        out = np.empty((len(users), self.user_tower.output_dim), np.float32)
        if known.any():
            out[known] = self.user_vectors[rows[known]]
        rest = [u for u, k in zip(users, known, strict=True) if not k]
        out[~known] = self.forward(rest)
        return out

    def forward(self, users: list[EncodedUser]) -> np.ndarray:
        """One user-tower forward over encoded users: [B, D] float32."""
        batch = {k: np.concatenate([u.columns[k] for u in users]) for k in users[0].columns}
        emb = self.user_tower(tower_inputs(to_tensors(batch), USER))[self.user_tower.output_key]
        return emb.float().numpy()

    def _search(self, queries: np.ndarray, ks: list[int], rows: list[Restriction]
                ) -> list[Answer]:
        """Top-k of each query [B, D] within its restriction, as raw ids."""
        scores, found = self.index.search(queries, max(ks), exclude=[r.exclude for r in rows],
                                          allow=[r.allow for r in rows])
        out = []
        for k, s, f in zip(ks, scores[:, :max(ks)], found, strict=True):
            hits = f[:k]
            hits = hits[hits >= 0].tolist()
            out.append(Answer([self.item_ids[r] for r in hits], s[:len(hits)].tolist(),
                              self.model_version))
        return out

    def recommend_encoded(self, queries: list[RecommendQuery]) -> list[Answer]:
        """Top-k per query: one forward, one index search (restrictions per query)."""
        emb = self.embed_users([q.user for q in queries])  # [B, D]
        return self._search(emb, [q.k for q in queries], [q.rows for q in queries])

    def similar_encoded(self, queries: list[SimilarQuery]) -> list[Answer]:
        """Nearest items to each query item, the item itself excluded."""
        emb = self.item_vectors[[q.row for q in queries]]  # [B, D]
        return self._search(emb, [q.k for q in queries], [q.rows for q in queries])

    def score_encoded(self, queries: list[ScoreQuery]) -> list[Answer]:
        """Each query's score for its items, as the index would score them."""
        users = as_searched(self.embed_users([q.user for q in queries]), self.similarity)
        return [Answer(q.item_ids, (self.item_vectors[q.rows] @ u).tolist(),  # [N]
                       self.model_version, key="scores")
                for q, u in zip(queries, users, strict=True)]

    # -- whole requests (encode + batch): the in-process API -----------------------------

    def recommend(self, requests: list[Any]) -> list[RecommendResponse]:
        """Top-k items for each request (``schemas.RecommendRequest``)."""
        answers = self.recommend_encoded([self.encode_recommend(r) for r in requests])
        return [a.to_model(RecommendResponse) for a in answers]

    def similar_items(self, requests: list[Any]) -> list[SimilarItemsResponse]:
        """Nearest catalogue items for each request's item."""
        answers = self.similar_encoded([self.encode_similar(r) for r in requests])
        return [a.to_model(SimilarItemsResponse) for a in answers]

    def score(self, requests: list[Any]) -> list[ScoreResponse]:
        """Scores of each request's items."""
        return [a.to_model(ScoreResponse)
                for a in self.score_encoded([self.encode_score(r) for r in requests])]

    def user_embeddings(self, requests: list[Any]) -> np.ndarray:
        """[B, D] user-tower output for requests (before the index's normalisation)."""
        return self.embed_users([self.encode_user(r) for r in requests])

