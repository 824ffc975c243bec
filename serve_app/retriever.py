"""The retrieval model of one run directory: user tower + index + catalogue (no Serve here).

:class:`Retriever` loads ``RUN_DIR/model`` (the user tower), ``RUN_DIR/index`` through
``indexing.build.load_index`` (which refuses an index built for another model), the
catalogue (``prepared/items.parquet``: row number = the index's id -> raw item id), the
item embeddings of the current model version (``embeddings/items/model_version=V``, or
computed with the item tower when absent) and every known user's encoded row
(``prepared/users.parquet``), so that a known user id alone is enough to recommend.

Every public method takes a LIST of requests: the Serve deployment batches concurrent
requests into one user-tower forward and one index search. Each method is also split in
two halves, ``encode_*`` (one request, raises a :class:`~serve_app.schemas.RequestError`
naming the field) and ``*_encoded`` (the batched forward and search), so a bad request is
rejected before it joins a batch and cannot fail its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexing.batches import to_tensors
from indexing.build import load_index
from indexing.embed import read_embeddings
from indexing.topk import as_searched
from pipeline.columns import ITEM, USER, tower_inputs
from pipeline.run_dir import RunDir, load_fitted, read_model_meta, read_table
from serve_app.encode import EncodedUser, RequestEncoder
from serve_app.schemas import (
    IndexSummary,
    RawId,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    ScoreRequest,
    ScoreResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
    UserQuery,
    VersionResponse,
)
from towers.exported import ExportedTower


@dataclass(frozen=True)
class RecommendQuery:
    """An encoded ``/recommend`` request: the user, k and the catalogue rows to leave out."""

    user: EncodedUser
    k: int
    exclude: np.ndarray  # [E] int64 catalogue rows


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


class Retriever:
    """Everything needed to answer requests for one trained run.

    Args:
        run_dir: a run directory with ``model/`` (meta and the exported user tower),
            ``index/``, ``embeddings/items/`` and ``prepared/``.

    Raises:
        FileNotFoundError: a part of the run directory is missing (names the file).
        ValueError: the index, the feature state, the exported tower or the catalogue do
            not belong to the model (names the field and both values).
    """

    def __init__(self, run_dir: str | Path):
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
        catalogue = read_table(run, ITEM)
        if self.manifest.item_count != catalogue.num_rows:
            raise ValueError(f"index manifest item_count={self.manifest.item_count} but "
                             f"{run.table(ITEM)} has {catalogue.num_rows} rows: "
                             "rebuild the index with jobs.build_index")
        self.encoder = RequestEncoder(fitted, read_table(run, USER), catalogue)
        self.item_ids: list[RawId] = catalogue[fitted.item_id].to_pylist()  # row -> raw id
        vectors = item_embeddings(run, self.model_version, fitted.item_id, catalogue.num_rows)
        self.item_vectors = as_searched(vectors, self.similarity)  # [I, D]

    def info(self) -> VersionResponse:
        """What this retriever serves (``GET /version``)."""
        m = self.manifest
        summary = IndexSummary(index_type=m.index_type, similarity=m.similarity.value,
                               dim=m.dim, item_count=m.item_count, params=m.params,
                               recall=m.recall.model_dump())
        return VersionResponse(model_version=self.model_version,
                               feature_state_hash=self.feature_state_hash, index=summary,
                               run_dir=str(self.run_dir))

    # -- one request -> its encoded form (raises RequestError naming the field) ----------

    def encode_recommend(self, request: RecommendRequest) -> RecommendQuery:
        """Encode the user and collect the rows to exclude (seen items, exclude_items)."""
        user = self.encoder.encode(request)
        parts = [user.seen] if request.exclude_seen else []
        rows = self.encoder.item_rows(request.exclude_items)
        exclude = np.unique(np.concatenate([*parts, rows[rows >= 0], np.zeros(0, np.int64)]))
        return RecommendQuery(user, request.k, exclude.astype(np.int64))

    def encode_score(self, request: ScoreRequest) -> ScoreQuery:
        """Encode the user; every item id must be in the catalogue."""
        rows = self.encoder.known_item_rows(request.item_ids, "item_ids")
        return ScoreQuery(self.encoder.encode(request), list(request.item_ids), rows)

    def encode_similar(self, request: SimilarItemsRequest) -> SimilarQuery:
        """The query item's catalogue row; an unknown id is an error."""
        row = self.encoder.known_item_rows([request.item_id], "item_id")[0]
        return SimilarQuery(int(row), request.k)

    # -- a batch of encoded requests -> responses (one forward, one search) --------------

    def embed_users(self, users: list[EncodedUser]) -> np.ndarray:
        """One user-tower forward over encoded users: [B, D] float32."""
        batch = {k: np.concatenate([u.columns[k] for u in users]) for k in users[0].columns}
        emb = self.user_tower(tower_inputs(to_tensors(batch), USER))[self.user_tower.output_key]
        return emb.float().numpy()

    def recommend_encoded(self, queries: list[RecommendQuery]) -> list[RecommendResponse]:
        """Top-k per query: one forward, one index search with the largest k of the batch."""
        emb = self.embed_users([q.user for q in queries])  # [B, D]
        k = max(q.k for q in queries)
        scores, rows = self.index.search(emb, k, exclude=[q.exclude for q in queries])
        return [RecommendResponse(items=self._scored(s[:q.k], r[:q.k]),
                                  model_version=self.model_version)
                for q, s, r in zip(queries, scores, rows, strict=True)]

    def similar_encoded(self, queries: list[SimilarQuery]) -> list[SimilarItemsResponse]:
        """Nearest items to each query item, the item itself excluded."""
        emb = self.item_vectors[[q.row for q in queries]]  # [B, D]
        k = max(q.k for q in queries)
        exclude = [np.array([q.row], np.int64) for q in queries]
        scores, rows = self.index.search(emb, k, exclude=exclude)
        return [SimilarItemsResponse(items=self._scored(s[:q.k], r[:q.k]),
                                     model_version=self.model_version)
                for q, s, r in zip(queries, scores, rows, strict=True)]

    def score_encoded(self, queries: list[ScoreQuery]) -> list[ScoreResponse]:
        """Each query's score for its items, as the index would score them."""
        users = as_searched(self.embed_users([q.user for q in queries]), self.similarity)
        out = []
        for q, u in zip(queries, users, strict=True):
            scores = self.item_vectors[q.rows] @ u  # [N]
            items = [ScoredItem(item_id=i, score=float(s))
                     for i, s in zip(q.item_ids, scores, strict=True)]
            out.append(ScoreResponse(scores=items, model_version=self.model_version))
        return out

    def _scored(self, scores: np.ndarray, rows: np.ndarray) -> list[ScoredItem]:
        """Index results [k] (rows -1 = padding) as raw ids with float scores."""
        return [ScoredItem(item_id=self.item_ids[r], score=float(s))
                for s, r in zip(scores.tolist(), rows.tolist(), strict=True) if r >= 0]

    # -- whole requests (encode + batch): the in-process API -----------------------------

    def recommend(self, requests: list[RecommendRequest]) -> list[RecommendResponse]:
        """Top-k items for each request."""
        return self.recommend_encoded([self.encode_recommend(r) for r in requests])

    def similar_items(self, requests: list[SimilarItemsRequest]
                      ) -> list[SimilarItemsResponse]:
        """Nearest catalogue items for each request's item."""
        return self.similar_encoded([self.encode_similar(r) for r in requests])

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResponse]:
        """Scores of each request's items."""
        return self.score_encoded([self.encode_score(r) for r in requests])

    def user_embeddings(self, requests: list[UserQuery]) -> np.ndarray:
        """[B, D] user-tower output for requests (before the index's normalisation)."""
        return self.embed_users([self.encoder.encode(r) for r in requests])
