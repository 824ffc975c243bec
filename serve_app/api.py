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
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config.serve import ServeConfig
from serve_app.contract import ContractError
from serve_app.schemas import (
    ErrorResponse,
    HealthResponse,
    RecommendResponse,
    RequestError,
    ScoreResponse,
    SimilarItemsResponse,
    VersionResponse,
    explain,
    request_models,
)

TITLE = "Towerline retrieval"
SUMMARY = ("Two-tower retrieval: the top k catalogue items for a user, the items nearest to "
           "an item, and scores of given items.")
JSON = "application/json"


class Service(Protocol):
    """What the routes call: the deployment (``serve_app.app.RetrievalDeployment``)."""

    async def recommend(self, body: Any) -> bytes: ...  # noqa: D102
    async def similar_items(self, body: Any) -> bytes: ...  # noqa: D102
    async def score(self, body: Any) -> bytes: ...  # noqa: D102
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
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            err = BodyTooLarge(int(declared), self.limit)
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


class JsonBodyRoute(APIRoute):
    """A route with one JSON body model whose valid requests skip FastAPI's body machinery.

    A request sent as ``application/json`` is validated by pydantic-core straight from its
    bytes (``model_validate_json``) and handed to the endpoint; anything else (another or
    no content type, a body that does not parse or validate) goes through FastAPI's own
    handler, so every error keeps FastAPI's status and shape and the OpenAPI document is
    FastAPI's. Measured in process on the demo run: FastAPI's JSON body handling costs
    about 55 us per request more than reading the bytes and validating them here.
    """

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        """FastAPI's handler, behind the fast path for a valid JSON body."""
        slow = super().get_route_handler()
        if self.body_field is None:
            return slow
        model, endpoint = self.body_field.field_info.annotation, self.endpoint

        async def handler(request: Request) -> Response:
            content_type = next((v for k, v in request.scope["headers"]
                                 if k == b"content-type"), b"")
            if content_type.split(b";", 1)[0].strip().lower() == b"application/json":
                try:
                    body = model.model_validate_json(await request.body())
                except ValidationError:
                    pass  # FastAPI's handler reads the same bytes and names the errors
                else:
                    return await endpoint(body)
            return await slow(request)

        return handler


def _errors(status: int, errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": errors})


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries of the 4xx answers a route can give."""
    what = {400: "The body is not UTF-8 text.",
            404: "An item id is not in the catalogue.",
            413: "The body is above serve.max_body_bytes.",
            422: "A field is missing, of the wrong type, above a serve bound, or not "
                 "in the run's contract (features, filter)."}
    return {s: {"model": ErrorResponse, "description": what[s]} for s in statuses}


def _add_error_handlers(app: FastAPI, cfg: ServeConfig) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _errors(422, explain(list(err.errors()), cfg))

    @app.exception_handler(RequestError)
    async def _refused(_: Request, err: RequestError) -> JSONResponse:
        return _errors(err.status_code, [err.detail()])

    @app.exception_handler(ContractError)
    async def _off_contract(_: Request, err: ContractError) -> JSONResponse:
        return _errors(422, err.errors)

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
        return _errors(413, err.errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        # e.g. 400 for a body that is not UTF-8, 405 for a wrong method: the same shape
        return JSONResponse(status_code=err.status_code, headers=err.headers, content={
            "detail": [{"type": "http_error", "loc": ["body"] if err.status_code == 400 else [],
                        "msg": str(err.detail), "input": None}]})


def build_api(service: Service, cfg: ServeConfig) -> FastAPI:
    """The FastAPI application of one replica, its request bounds taken from ``cfg``.

    Args:
        service: the deployment the routes call.
        cfg: the deployment's serve config.
    """
    models = request_models(cfg)
    app = FastAPI(title=TITLE, description=SUMMARY, version="1")
    _add_error_handlers(app, cfg)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    async def recommend(body: models.recommend) -> Response:
        return Response(content=await service.recommend(body), media_type=JSON)

    async def similar_items(body: models.similar_items) -> Response:
        return Response(content=await service.similar_items(body), media_type=JSON)

    async def score(body: models.score) -> Response:
        return Response(content=await service.score(body), media_type=JSON)

    routes = APIRouter(route_class=JsonBodyRoute)
    routes.post("/recommend", response_model=RecommendResponse,
                responses=_documented(400, 413, 422),
                summary="The top k catalogue items for a user",
                description="For a known user id, raw features and/or a history; optionally "
                "within a filter or an allow-list.")(recommend)
    routes.post("/similar-items", response_model=SimilarItemsResponse,
                responses=_documented(400, 404, 413, 422),
                summary="The catalogue items nearest to one item")(similar_items)
    routes.post("/score", response_model=ScoreResponse,
                responses=_documented(400, 404, 413, 422),
                summary="The user's score for each given item, in request order")(score)
    app.include_router(routes)
    app.get("/healthz", response_model=HealthResponse,
            summary="Liveness and the model version served")(service.health)
    app.get("/version", response_model=VersionResponse,
            summary="Model version, feature-state hash, index summary, rollout status")(
        service.version)
    _serve_run_schema(app, service)
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
