"""The HTTP face of the deployment: routes, error shapes, the body cap and the OpenAPI file.

:func:`build_api` makes one FastAPI application per replica (Serve calls the deployment's
``__serve_build_asgi_app__``), so that every bound of the deployment's ``ServeConfig`` is in
the request classes and so in ``/openapi.json``; the per-run parts of the contract
(``features`` columns, ``filter`` attributes) are written into that document from the run
being served, each time it changes.

Answers are rendered to JSON bytes by the retriever (:class:`~serve_app.retriever.Answer`)
and returned as they are: the routes still declare their response models, for the docs.
Every 4xx body is ``{"detail": [{"type", "loc", "msg", "input"}]}``; 404 (an unknown item),
413 (a body above ``serve.max_body_bytes``) and 422 are in the OpenAPI document.
"""

# No ``from __future__ import annotations``: FastAPI reads the route bodies' annotations,
# which name classes local to build_api, so they must be objects, not strings.
import asyncio
import inspect
import json
from typing import Any, Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette._utils import get_route_path
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config.serve import ServeConfig
from serve_app.contract import ContractError
from serve_app.request_errors import RequestError, cap_errors, explain, json_safe
from serve_app.schemas import (
    ErrorResponse,
    EventsResponse,
    HealthResponse,
    RecommendResponse,
    ScoreResponse,
    SimilarItemsResponse,
    VersionResponse,
    request_models,
)
from serve_app.user_store import StoreReadOnly, StoreUnavailable

RETRY_AFTER_S = 1  # a 503's Retry-After while the user-state store is down
TITLE = "Towerline retrieval"
SUMMARY = ("Two-tower retrieval: the top k catalogue items for a user, the items nearest to "
           "an item, and scores of given items.")
JSON = "application/json"


class Service(Protocol):
    """What the routes call: the deployment (``serve_app.app.RetrievalDeployment``)."""

    async def recommend(self, body: Any) -> bytes: ...  # noqa: D102
    async def similar_items(self, body: Any) -> bytes: ...  # noqa: D102
    async def score(self, body: Any) -> bytes: ...  # noqa: D102
    async def events(self, body: Any) -> EventsResponse: ...  # noqa: D102
    async def health(self) -> HealthResponse: ...  # noqa: D102
    async def version(self) -> VersionResponse: ...  # noqa: D102
    def run_schemas(self) -> tuple[str, dict[str, dict[str, Any]]]: ...  # noqa: D102


class BodyTooLarge(HTTPException):
    """A request body above ``serve.max_body_bytes`` (HTTP 413)."""

    def __init__(self, size: int | None, limit: int):
        super().__init__(413)
        seen = "more than" if size is None else f"{size:,}"
        self.errors = [{"type": "body_too_large", "loc": ["body"],
                        "msg": f"the request body has {seen} bytes; at most {limit:,} "
                               "(serve.max_body_bytes) are accepted", "input": None}]


class BodyLimit:
    """Refuse bodies above ``limit`` bytes: by Content-Length before reading, else as read.

    Args:
        app: the ASGI application it wraps.
        limit: the largest body accepted, in bytes.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 for a declared length above the limit; else count as it is read."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _declared_length(scope["headers"])
        if declared is not None and declared > self.limit:
            err = BodyTooLarge(declared, self.limit)
            return await _errors(413, err.errors)(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # a chunked body without a length: stop as it passes
                raise BodyTooLarge(None, self.limit)
            return message

        return await self.app(scope, counted, send)


class ServingAPI(FastAPI):
    """FastAPI with a direct path for the valid JSON requests of its body routes.

    A ``POST`` to a route with one body model (``/recommend``, ``/similar-items``,
    ``/score``), sent as ``application/json`` with a ``Content-Length`` within
    ``serve.max_body_bytes``, is read, validated by pydantic-core straight from its bytes
    and handed to the route's endpoint here, without Starlette's middleware stack, router
    and ``Request`` machinery. An exception the endpoint raises is answered by the app's
    own exception handler for it. Anything else (another method or path, another or no
    content type, a chunked or oversized body, a body that does not parse or validate)
    goes through FastAPI whole, the bytes already read replayed to it, so every error
    keeps FastAPI's status and shape and the OpenAPI document is FastAPI's. Measured in
    process on the demo run (the app called over ASGI, 2026-12-03): a ``/recommend`` of a
    known user took 348 us through FastAPI (with a route class that validated the bytes
    itself) and 254 us here; a bare FastAPI route that reads the body and returns a
    constant takes 68 us.

    Every request body (``POST``, ``PUT``, ``PATCH``) is read here first, whole, within
    ``serve.body_timeout_s`` (a 408 past it) and ``serve.max_body_bytes`` (a 413), so a
    client that trickles its body frees its replica slot after the deadline.
    """

    _direct: dict[str, tuple[Any, Any]] = {}  # path -> (body model, endpoint); none until set
    _body_limit = 0
    _body_timeout = ServeConfig().body_timeout_s

    def direct_routes(self, body_limit: int, body_timeout: float) -> None:
        """Take the body routes registered so far onto the direct path (call once, last).

        Args:
            body_limit: ``serve.max_body_bytes``.
            body_timeout: ``serve.body_timeout_s``, for every request body.
        """
        self._body_limit, self._body_timeout = body_limit, body_timeout
        self._direct = {route.path: (route.body_field.field_info.annotation, route.endpoint)
                        for route in self.routes
                        if isinstance(route, APIRoute) and route.body_field is not None
                        and route.methods == {"POST"} and "{" not in route.path
                        and _is_model(route.body_field.field_info.annotation)}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The body within its deadline, then the direct path or FastAPI with it replayed."""
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await super().__call__(scope, receive, send)
        declared = _declared_length(scope["headers"])
        if declared is not None and declared > self._body_limit:
            return await super().__call__(scope, receive, send)  # 413 before reading it
        try:
            body = await read_body(receive, self._body_limit, self._body_timeout)
        except ClientGone:
            return
        except (BodyTimeout, BodyTooLarge) as err:
            return await _errors(err.status_code, err.errors)(scope, receive, send)
        replay = _replay(body, receive)
        route = self._direct.get(get_route_path(scope)) if scope["method"] == "POST" else None
        if route is None or declared is None or not _is_json(scope["headers"]):
            return await super().__call__(scope, replay, send)
        model, endpoint = route
        try:
            parsed = model.model_validate_json(body)
        except ValidationError:
            # FastAPI's handler reads the same bytes and names the errors
            return await super().__call__(scope, replay, send)
        try:
            response = await endpoint(parsed)
        except Exception as err:
            handler = next((self.exception_handlers[cls] for cls in type(err).__mro__
                            if cls in self.exception_handlers), None)
            if handler is None:
                raise
            response = handler(Request(scope, replay), err)
            if inspect.isawaitable(response):  # Starlette also takes plain-function handlers
                response = await response
        await response(scope, replay, send)


def _is_model(annotation: Any) -> bool:
    """Whether a body annotation is one pydantic model (``/events`` takes a list)."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


class ClientGone(Exception):
    """The client left before its body arrived: nothing to answer."""


class BodyTimeout(HTTPException):
    """A body that took longer than ``serve.body_timeout_s`` to arrive (HTTP 408)."""

    def __init__(self, timeout: float, received: int):
        super().__init__(408)
        self.errors = [{"type": "body_timeout", "loc": ["body"], "input": None,
                        "msg": f"the request body did not arrive within {timeout:g} s "
                               f"(serve.body_timeout_s); {received:,} bytes came"}]


async def read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    """The whole request body, at most ``limit`` bytes, within ``timeout`` seconds.

    A request holds one of the replica's slots (``max_ongoing_requests``) from its headers
    on; a client that sends its body a byte at a time would hold it for as long as it
    likes. The deadline counts from the first read, over the whole body.

    Raises:
        BodyTimeout: the body was not complete in time.
        BodyTooLarge: more than ``limit`` bytes came.
        ClientGone: the client disconnected.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    chunks, size, more = [], 0, True
    while more:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            raise BodyTimeout(timeout, size) from None
        if message["type"] != "http.request":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(None, limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case, as ASGI gives them), else None."""
    return next((v for k, v in headers if k == name), None)


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` a request declares, None when it declares none readable."""
    value = _header(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _is_json(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request's content type is ``application/json`` (parameters aside)."""
    value = _header(headers, b"content-type")
    return value is not None and value.split(b";", 1)[0].strip().lower() == b"application/json"


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` first, then whatever ``receive`` gives."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class ErrorJSON(JSONResponse):
    """A 4xx body: strict JSON in UTF-8 whatever the request held (see ``json_safe``)."""

    def render(self, content: Any) -> bytes:
        """``content`` as compact JSON; NaN, Infinity and lone surrogates made text."""
        return json.dumps(json_safe(content), ensure_ascii=False, allow_nan=False,
                          separators=(",", ":")).encode("utf-8")


def _errors(status: int, errors: list[dict[str, Any]],
            limit: int = ServeConfig().max_errors) -> JSONResponse:
    return ErrorJSON(status_code=status, content={"detail": cap_errors(errors, limit)})


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of the 4xx answers a route can give."""
    what = {400: "The body is not UTF-8 text.",
            408: "The body did not arrive within serve.body_timeout_s.",
            404: "An item id is not in the catalogue.",
            413: "The body is above serve.max_body_bytes.",
            422: "A field is missing, of the wrong type, above a serve bound, or not "
                 "in the run's contract (features, filter)."}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


def _unavailable() -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries of the store's refusals: 409 (no events kept), 503 (down)."""
    return {409: {"model": ErrorResponse, "description": "serve.user_store is memory: no "
                  "events are kept."},
            503: {"model": ErrorResponse, "description": "The user-state store does not "
                  "answer; retry after Retry-After seconds."}}


def _add_error_handlers(app: FastAPI, cfg: ServeConfig) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _errors(422, explain(list(err.errors()), cfg), cfg.max_errors)

    @app.exception_handler(RequestError)
    async def _refused(_: Request, err: RequestError) -> JSONResponse:
        return _errors(err.status_code, [err.detail()], cfg.max_errors)

    @app.exception_handler(ContractError)
    async def _off_contract(_: Request, err: ContractError) -> JSONResponse:
        return _errors(422, err.errors, cfg.max_errors)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(_: Request, err: StoreUnavailable) -> JSONResponse:
        return ErrorJSON(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)},
                         content={"detail": [{"type": "store_unavailable", "loc": [],
                                              "msg": str(err), "input": None}]})

    @app.exception_handler(StoreReadOnly)
    async def _read_only(_: Request, err: StoreReadOnly) -> JSONResponse:
        return _errors(409, [{"type": "store_read_only", "loc": [], "msg": str(err),
                              "input": None}])

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
        return _errors(413, err.errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        # e.g. 400 for a body that is not UTF-8, 405 for a wrong method: the same shape
        return ErrorJSON(status_code=err.status_code, headers=err.headers, content={
            "detail": [{"type": "http_error", "loc": ["body"] if err.status_code == 400 else [],
                        "msg": str(err.detail), "input": None}]})


def build_api(service: Service, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application of one replica, its request bounds taken from ``cfg``.

    Args:
        service: the deployment the routes call.
        cfg: the deployment's serve config.
    """
    models = request_models(cfg)
    app = ServingAPI(title=TITLE, description=SUMMARY, version="1")
    _add_error_handlers(app, cfg)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    async def recommend(body: models.recommend) -> Response:
        return Response(content=await service.recommend(body), media_type=JSON)

    async def similar_items(body: models.similar_items) -> Response:
        return Response(content=await service.similar_items(body), media_type=JSON)

    async def score(body: models.score) -> Response:
        return Response(content=await service.score(body), media_type=JSON)

    app.post("/recommend", response_model=RecommendResponse,
             responses={**_documented(400, 408, 413, 422), 503: _unavailable()[503]},
             summary="The top k catalogue items for a user",
             description="For a known user id, raw features and/or a history; optionally "
             "within a filter or an allow-list.")(recommend)
    app.post("/similar-items", response_model=SimilarItemsResponse,
             responses=_documented(400, 404, 408, 413, 422),
             summary="The catalogue items nearest to one item")(similar_items)
    app.post("/score", response_model=ScoreResponse,
             responses=_documented(400, 404, 408, 413, 422),
             summary="The user's score for each given item, in request order")(score)
    async def events(body: models.events) -> EventsResponse:
        return await service.events(body)

    app.post("/events", response_model=EventsResponse,
             responses={**_documented(400, 408, 413, 422), **_unavailable()},
             summary="Add interactions to users' state and to the events log",
             description="One event or a list of up to serve.max_events; written to the "
             "user-state store and the events log before the answer.")(events)
    app.get("/healthz", response_model=HealthResponse,
            summary="Liveness and the model version served")(service.health)
    app.get("/version", response_model=VersionResponse,
            summary="Model version, feature-state hash, index summary, rollout status")(
        service.version)
    _serve_run_schema(app, service)
    app.direct_routes(cfg.max_body_bytes, cfg.body_timeout_s)
    return app


def _serve_run_schema(app: FastAPI, service: Service) -> None:
    """``/openapi.json`` with the run's ``features`` and ``filter`` schemas written in."""
    cache: dict[str, dict[str, Any]] = {}
    base = app.openapi

    def openapi() -> dict[str, Any]:
        version, parts = service.run_schemas()
        if version not in cache:
            app.openapi_schema = None  # FastAPI caches the document it generates
            doc = base()
            schemas = doc["components"]["schemas"]
            parts = dict(parts)
            event = schemas.get("Event", {}).get("properties", {})
            for field, schema in parts.pop("Event", {}).items():  # the run's key types
                event[field] = {**schema, "description": event[field].get("description", "")}
            for name in ("RecommendRequest", "ScoreRequest", "SimilarItemsRequest"):
                props = schemas.get(name, {}).get("properties", {})
                for field, schema in parts.items():
                    if field in props:
                        props[field] = {**schema, "description": props[field].get(
                            "description", "")}
            cache.clear()
            cache[version] = doc
        app.openapi_schema = cache[version]
        return cache[version]

    app.openapi = openapi  # type: ignore[method-assign]
