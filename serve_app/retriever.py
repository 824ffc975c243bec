"""The retrieval model of one run directory: user tower + index + catalogue (no Serve here).

:class:`Retriever` loads ``RUN_DIR/model`` (the user tower), ``RUN_DIR/index`` through
``indexing.build.load_index`` (which refuses an index built for another model), the
catalogue (``prepared/items.parquet``: row number = the index's id -> raw item id, checked
row for row against the index manifest's catalogue hash), the item embeddings of the
current model version (``embeddings/items/model_version=V``), the user-state store
(:mod:`serve_app.user_store`, ``serve.user_store``: each request's user is read from it,
with the events posted since prepare; a known user with no event since, sent without
overrides, keeps the embedding the index build wrote and needs no tower forward), the
events log (:mod:`serve_app.events`), the per-run request contract and the attribute
index of the catalogue. Every
read is checked at this edge: a run that does not load raises ``FileNotFoundError`` or
``ValueError`` naming the file (and the field or column).

Every public method takes a LIST of requests: the Serve deployment batches concurrent
requests into one user-tower forward and one index search. Each method is also split in
two halves, ``encode_*`` (one request, raises a :class:`~serve_app.request_errors.RequestError`
naming the field) and ``*_encoded`` (the batched forward and search, returning
:class:`Answer` lists that render straight to JSON), so a bad request is rejected before it
joins a batch and cannot fail its neighbours.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from indexing.batches import to_tensors
from indexing.build import check_catalogue, load_index
from indexing.embed import read_embeddings
from indexing.topk.kernels import as_searched
from pipeline.columns import ITEM, SEEN, USER, tower_inputs
from pipeline.config.serve import UserStoreKind
from pipeline.rows import id_feature_names
from pipeline.run_dir import ModelMeta, RunDir, load_fitted, read_model_meta, read_table
from pipeline.state import FeatureStateSet
from pipeline.transforms import distinct
from serve_app.contract import RunContract, filterable
from serve_app.encode import EncodedUser, RequestEncoder
from serve_app.events import EventLog, LogColumns
from serve_app.filters import AttributeIndex
from serve_app.queries import Answer, RecommendQuery, Restriction, ScoreQuery, SimilarQuery
from serve_app.request_errors import RequestError
from serve_app.schemas import (
    ID_MAX,
    ID_MIN,
    EventsResponse,
    IndexSummary,
    RawId,
    RecommendResponse,
    ScoreResponse,
    SimilarItemsResponse,
    VersionResponse,
)
from serve_app.store_backends import LmdbBackend, RedisBackend, redis_prefix
from serve_app.user_store import Layout, MemoryStore, StoreUnavailable, UserStore
from towers.exported import ExportedTower


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
        catalogue = read_table(run, ITEM)
        require_columns(catalogue, run.table(ITEM), [fitted.item_id], "the item key")
        check_catalogue(self.manifest, run, catalogue[fitted.item_id])
        self.encoder = RequestEncoder(fitted, catalogue)
        self.item_ids: list[RawId] = self.encoder.item_ids  # row -> raw id
        vectors = item_embeddings(run, self.model_version, fitted.item_id, catalogue.num_rows)
        self.item_vectors = as_searched(vectors, self.similarity)  # [I, D]
        cfg = serve_config or meta.config.serve
        self.stored_embeddings = cfg.stored_user_embeddings
        self.max_string_length = cfg.max_string_length
        self.store = open_store(run, cfg, meta, fitted)
        d = meta.config.data
        self.events = None if self.store.read_only else EventLog(
            Path(cfg.events_dir) if cfg.events_dir else run.root.parent / "events",
            LogColumns(d.user_id, d.item_id, d.timestamp, d.weight or "weight",
                       self.store.layout.arrow_key_type(),
                       catalogue.schema.field(fitted.item_id).type))
        attributes = filterable(fitted.item, id_feature_names(fitted.item, fitted.item_id))
        self.attributes = AttributeIndex(catalogue, attributes)
        sources = {src: [fitted.user.features[n] for n in names]
                   for src, names in self.encoder.sources.items()}
        self.contract = RunContract.build(sources, attributes, cfg)

    def info(self) -> VersionResponse:
        """What this retriever serves (``GET /version``; no paths)."""
        m = self.manifest
        summary = IndexSummary(index_type=m.index.factory, similarity=m.index.similarity.value,
                               dim=m.index.dim, item_count=m.index.count,
                               params=m.index.params, recall=m.recall.model_dump())
        return VersionResponse(model_version=self.model_version,
                               feature_state_hash=self.feature_state_hash, index=summary)

    # -- one request -> its encoded form (raises RequestError naming the field) ----------

    def encode_user(self, request: Any) -> EncodedUser:
        """The user part of a request, its ``features`` checked against the run first.

        The user's state is read from the store. A store that is down fails the request
        (:class:`StoreUnavailable`, a 503) unless it sends its own ``history``: that one is
        served from the history, its stored features left out.
        """
        if request.features:
            self.contract.check_features(request.features)
        state = None
        if request.user_id is not None:
            try:
                state = self.store.read([request.user_id])[0]
            except StoreUnavailable:
                if request.history is None:
                    raise
        user = self.encoder.encode(request, state)
        if not self.stored_embeddings and user.embedding is not None:
            user = EncodedUser(user.columns, user.seen, None, user.state_version)
        return user

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

        A known user with no event since prepare, sent without overrides, has the
        embedding the index build wrote for its row (the same tower on the same row,
        computed once); every other request runs the exported tower, all of them in one
        forward.
        """
        known = np.array([u.embedding is not None for u in users])
        if known.all():  # every one stored (the common case): one stack
            return np.stack([u.embedding for u in users]).astype(np.float32, copy=False)
        out = np.empty((len(users), self.user_tower.output_dim), np.float32)
        if known.any():
            out[known] = np.stack([u.embedding for u in users if u.embedding is not None])
        rest = [u for u, k in zip(users, known, strict=True) if not k]
        out[~known] = self.forward(rest)
        return out

    def forward(self, users: list[EncodedUser]) -> np.ndarray:
        """One user-tower forward over encoded users: [B, D] float32."""
        batch = {k: np.concatenate([u.columns[k] for u in users]) for k in users[0].columns}
        emb = self.user_tower(tower_inputs(to_tensors(batch), USER))[self.user_tower.output_key]
        return emb.float().numpy()

    def _search(self, queries: np.ndarray, ks: list[int], rows: list[Restriction],
                versions: list[int | None] | None = None) -> list[Answer]:
        """Top-k of each query [B, D] within its restriction, as raw ids.

        ``versions``: each answer's ``state_version`` (its user's events since prepare).
        """
        scores, found = self.index.search(queries, max(ks), exclude=[r.exclude for r in rows],
                                          allow=[r.allow for r in rows])
        out = []
        for i, (k, s, f) in enumerate(zip(ks, scores[:, :max(ks)], found, strict=True)):
            hits = f[:k]
            hits = hits[hits >= 0].tolist()
            out.append(Answer([self.item_ids[r] for r in hits], s[:len(hits)].tolist(),
                              self.model_version,
                              state_version=versions[i] if versions else None))
        return out

    def recommend_encoded(self, queries: list[RecommendQuery]) -> list[Answer]:
        """Top-k per query: one forward, one index search (restrictions per query)."""
        emb = self.embed_users([q.user for q in queries])  # [B, D]
        return self._search(emb, [q.k for q in queries], [q.rows for q in queries],
                            [q.user.state_version for q in queries])

    def similar_encoded(self, queries: list[SimilarQuery]) -> list[Answer]:
        """Nearest items to each query item, the item itself excluded."""
        emb = self.item_vectors[[q.row for q in queries]]  # [B, D]
        return self._search(emb, [q.k for q in queries], [q.rows for q in queries])

    def score_encoded(self, queries: list[ScoreQuery]) -> list[Answer]:
        """Each query's score for its items, as the index would score them."""
        users = as_searched(self.embed_users([q.user for q in queries]), self.similarity)
        return [Answer(q.item_ids, (self.item_vectors[q.rows] @ u).tolist(),  # [N]
                       self.model_version, "scores", q.user.state_version)
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


    # -- events ------------------------------------------------------------------------

    def post_events(self, events: list[Any]) -> EventsResponse:
        """Log events, then append those of catalogue items to the store; the counts.

        Each event's user id must be of the run's key type and its item id of the
        catalogue's (a 422 naming ``[i, field]``); an item the catalogue does not hold is
        logged and left out of the store, as prepare drops such interactions. The log file
        is written first and the store append names it, in one transaction: a store that
        is down removes the file again and raises (a 503), so a 2xx means both hold the
        events and a retry never doubles them.

        Raises:
            RequestError: an id of the wrong type.
            StoreUnavailable / StoreReadOnly: the store cannot take events.
        """
        if self.events is None:
            self.store.append([], "")  # the memory path: raises StoreReadOnly, the reason
        keys = [self.store.key(e.user_id) for e in events]
        for i, (e, k) in enumerate(zip(events, keys, strict=True)):
            if k is None:
                raise RequestError((i, "user_id"), e.user_id, (
                    f"[{i}].user_id={e.user_id!r} is not a {self.store.layout.key_type} user "
                    "key of this run"))
        items = [e.item_id for e in events]
        try:
            item_col = pa.array(items, self.events.columns.item_type)
        except (pa.ArrowException, TypeError, OverflowError):
            i = next(i for i, v in enumerate(items) if not _fits(v, self.events.columns.item_type))
            raise RequestError((i, "item_id"), items[i], (
                f"[{i}].item_id={items[i]!r} is not of the catalogue's key type "
                f"({self.events.columns.item_type})")) from None
        rows = self.encoder.item_rows(items)
        now = int(time.time())
        times = [now if e.timestamp is None else e.timestamp for e in events]
        integer = pa.types.is_integer(self.events.columns.user_type)
        users = pa.array([int(k) if integer else k.decode("utf-8", "surrogatepass")
                          for k in keys], self.events.columns.user_type)  # as the keys read
        weights = [1.0 if e.weight is None else e.weight for e in events]
        name = self.events.write(users, item_col, times, weights)
        known = [(k, int(r), t) for k, r, t in zip(keys, rows, times, strict=True) if r >= 0]
        try:
            self.store.append(known, name)
        except Exception:
            self.events.remove(name)
            raise
        return EventsResponse(accepted=len(events), in_history=len(known),
                              unknown_items=[i for i, r in enumerate(rows) if r < 0],
                              model_version=self.model_version)

    def event_key_schemas(self) -> dict[str, dict[str, Any]]:
        """JSON schemas of an event's ``user_id`` and ``item_id`` for this run's key types."""
        if self.events is None:
            return {}
        c = self.events.columns
        return {"user_id": key_schema(c.user_type, self.max_string_length),
                "item_id": key_schema(c.item_type, self.max_string_length)}

    def replay(self) -> int:
        """Apply the log files this store has not seen (posted to another run); events applied.

        A file is applied once, whichever replica gets to it first (the store keeps the
        set of applied files in the transaction that appends their events).
        """
        if self.events is None:
            return 0
        applied, done = self.store.backend.applied(), 0
        for name in self.events.files():
            if name in applied:
                continue
            table = self.events.read(name)
            c = self.events.columns
            rows = self.encoder.item_rows(table[c.item_id].to_pylist())
            keys = [self.store.key(u) for u in table[c.user_id].to_pylist()]
            times = table[c.timestamp].to_pylist()
            known = [(k, int(r), int(t)) for k, r, t in zip(keys, rows, times, strict=True)
                     if r >= 0 and k is not None]
            if self.store.append(known, name):
                done += len(known)
        return done


def key_schema(typ: pa.DataType, max_length: int) -> dict[str, Any]:
    """The JSON schema of a raw key of Arrow type ``typ`` (integer within JSON's range, or text)."""
    if pa.types.is_integer(typ):
        return {"type": "integer", "minimum": ID_MIN, "maximum": ID_MAX}
    return {"type": "string", "maxLength": max_length}


def _fits(value: Any, typ: pa.DataType) -> bool:
    try:
        pa.array([value], typ)
    except (pa.ArrowException, TypeError, OverflowError):
        return False
    return True


def open_store(run: RunDir, cfg: Any, meta: ModelMeta, fitted: FeatureStateSet
               ) -> UserStore | MemoryStore:
    """The user-state store ``cfg.user_store`` names, checked to belong to this model.

    Raises:
        FileNotFoundError: the run has no store (names the command that writes it), or the
            Redis server holds no copy of it.
        ValueError: the store was built for another model.
        StoreUnavailable: the Redis server does not answer.
    """
    if cfg.user_store is UserStoreKind.MEMORY:
        users = read_table(run, USER)
        require_columns(users, run.table(USER), [fitted.user_id, SEEN], "key / seen items")
        emb = stored_user_embeddings(run, meta.model_version, fitted.user_id, users.num_rows) \
            if cfg.stored_user_embeddings else None
        return MemoryStore(users, fitted.user_id, emb)
    layout = Layout.read(run.user_state)
    if layout.model_version != meta.model_version:
        raise ValueError(f"{run.user_state} was built for model {layout.model_version}, not "
                         f"{meta.model_version}: re-run `python -m jobs.build_index`")
    if cfg.user_store is UserStoreKind.EMBEDDED:
        return UserStore(layout, LmdbBackend(run.user_state))
    backend = RedisBackend(cfg.redis_url, redis_prefix(layout), cfg.store_timeout_s)
    if not backend.has_layout():
        backend.close()
        raise FileNotFoundError(f"the Redis server at {cfg.redis_url} holds no store "
                                f"{layout.store_id}: run `python -m jobs.user_store "
                                f"{run.root} --redis-url {cfg.redis_url}`")
    return UserStore(layout, backend)
