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
import pyarrow.parquet as pq
import torch

from indexing.build import load_index
from indexing.embed import embeddings_dir, local_embed, read_embeddings
from pipeline.config_model import Similarity
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
from towers.topk import l2_normalize
from training.checkpoint import load_model
from training.data import ITEM, USER, to_tensors, tower_inputs


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


def item_embeddings(run_dir: Path, model: torch.nn.Module, model_version: str,
                    key: str, count: int) -> np.ndarray:
    """[I, D] item embeddings in catalogue order, from the batch job's Parquet if it matches.

    Uses ``embeddings/items/model_version=V`` of the model being served when it holds one
    row per catalogue item; otherwise embeds ``prepared/items.parquet`` with the item tower.
    """
    folder = embeddings_dir(run_dir, ITEM, model_version)
    if folder.exists():
        _, rows, emb = read_embeddings(folder, key)
        if np.array_equal(rows, np.arange(count)):
            return emb
    return local_embed(run_dir, ITEM, model.encode_item)


class Retriever:
    """Everything needed to answer requests for one trained run.

    Args:
        run_dir: a run directory with ``model/``, ``index/`` and ``prepared/``.

    Raises:
        FileNotFoundError: a part of the run directory is missing (names the file).
        ValueError: the index, the feature state or the catalogue do not belong to the
            model (names the field and both values).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()
        model, meta, fitted, cfg = load_model(self.run_dir)
        self.model = model
        self.model_version: str = meta["model_version"]
        self.feature_state_hash: str = meta["feature_state_hash"]
        self.similarity = cfg.model.similarity
        self.index, self.manifest = load_index(self.run_dir, meta, self.similarity,
                                               cfg.model.output_dim)
        prepared = self.run_dir / "prepared"
        catalogue = pq.read_table(prepared / "items.parquet")
        if self.manifest["item_count"] != catalogue.num_rows:
            raise ValueError(f"index manifest item_count={self.manifest['item_count']} but "
                             f"{prepared / 'items.parquet'} has {catalogue.num_rows} rows: "
                             "rebuild the index with jobs.build_index")
        self.encoder = RequestEncoder(fitted, pq.read_table(prepared / "users.parquet"),
                                      catalogue)
        self.item_ids: list[RawId] = catalogue[fitted.item_id].to_pylist()  # row -> raw id
        vectors = item_embeddings(self.run_dir, model, self.model_version, fitted.item_id,
                                  catalogue.num_rows)
        self.item_vectors = self._as_searched(vectors)  # [I, D]

    def _as_searched(self, x: np.ndarray) -> np.ndarray:
        """[N, D] vectors as the index compares them (unit norm for cosine)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return l2_normalize(x) if self.similarity is Similarity.COSINE else x

    def info(self) -> VersionResponse:
        """What this retriever serves (``GET /version``)."""
        m = self.manifest
        summary = IndexSummary(index_type=m["index_type"], similarity=m["similarity"],
                               dim=m["dim"], item_count=m["item_count"], params=m["params"],
                               recall=m["recall"])
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
        with torch.no_grad():
            emb = self.model.encode_user(tower_inputs(to_tensors(batch), USER))
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
        users = self._as_searched(self.embed_users([q.user for q in queries]))  # [B, D]
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
