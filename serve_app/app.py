"""The Ray Serve retrieval deployment (FastAPI ingress) and its application builder.

Endpoints (OpenAPI docs at ``/docs``): ``POST /recommend``, ``POST /similar-items``,
``POST /score``, ``GET /healthz``, ``GET /version``. Bodies are in :mod:`serve_app.schemas`.

Batching: each request is validated and encoded on its own (a bad one gets its 4xx and
never joins a batch); the user-tower forward and the index search then run once for all
requests that arrive within ``batch_wait_timeout_s`` (up to ``max_batch_size``), via
``@serve.batch``. Both values come from the run's ``serve`` config and are applied with
``set_max_batch_size`` / ``set_batch_wait_timeout_s``.

Rollout: the run directory is the deployment's ``user_config`` (``{"run_dir": ...}``).
``reconfigure`` builds the new :class:`~serve_app.retriever.Retriever` first and swaps it
in with one assignment only when it loaded; a request keeps the retriever it was encoded
with until it is answered, so a rollout fails no request and never mixes two versions
in one answer. A run directory that does not load (missing files, an index built for
another model) leaves the old retriever serving and shows as ``rollout_error`` in
``GET /version``; only the first load raises (the deployment refuses to start). Check a run
with ``python -m serve_app.check RUN_DIR`` before pointing ``user_config`` at it.

    python -m serve_app.deploy_config RUN_DIR --out serve.yaml  # host / port of the run
    serve deploy serve.yaml                                      # or: serve run serve.yaml
    serve run serve_app.app:build_app run_dir=/abs/path/RUN_DIR [num_replicas=2 ...]

HTTP: the run's ``serve.host`` / ``serve.port`` are Serve's ``http_options``, set when
Serve starts, for every application on the node: :func:`run_app` (in code) passes them to
``serve.start``, and :mod:`serve_app.deploy_config` writes them into the deploy YAML. A
bare ``serve run serve_app.app:build_app`` has no way to pass them and uses Serve's
defaults (127.0.0.1:8000).
"""

# No ``from __future__ import annotations`` here: serve.ingress re-wraps the route methods,
# and FastAPI must see the real body classes, not strings, to read them from the body.
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from ray import serve
from ray.serve import Application

from pipeline.config.serve import ServeConfig
from pipeline.run_dir import RunDir, read_model_meta
from serve_app.retriever import Retriever
from serve_app.schemas import (
    HealthResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadConfig,
    RequestError,
    ScoreRequest,
    ScoreResponse,
    SimilarItemsRequest,
    SimilarItemsResponse,
    VersionResponse,
    limit_errors,
)

logger = logging.getLogger("ray.serve")
DEPLOYMENT = "Retrieval"
APP_NAME = "towerline"  # the application's name in configs/serve.yaml
# Serve's HTTP proxy is shared by every application on a node: host / port are applied
# when Serve starts (http_options), never as an application's builder argument.
NOT_OVERRIDABLE = ("host", "port")

app = FastAPI(title="Towerline retrieval", description=__doc__.split("\n\n")[0],
              version="1")


@app.exception_handler(RequestError)
async def _request_error(_: Request, err: RequestError) -> JSONResponse:
    """A request the retriever cannot answer: 422 (or 404 for an unknown item)."""
    return JSONResponse(status_code=err.status_code,
                        content={"detail": [jsonable_encoder(err.detail())]})


@dataclass(frozen=True)
class Job:
    """One encoded request waiting in a batch, with the retriever that encoded it."""

    retriever: Retriever
    query: Any  # RecommendQuery or ScoreQuery of that retriever


def run_grouped(jobs: list[Job], method: Callable[[Retriever, list], list]) -> list:
    """Answer a batch with one call per retriever (two only during a rollout), in order."""
    out: list = [None] * len(jobs)
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(id(job.retriever), []).append(i)
    for positions in groups.values():
        answers = method(jobs[positions[0]].retriever, [jobs[i].query for i in positions])
        for i, answer in zip(positions, answers, strict=True):
            out[i] = answer
    return out


@serve.deployment(name=DEPLOYMENT)
@serve.ingress(app)
class RetrievalDeployment:
    """User tower + index behind HTTP; the run directory arrives through ``reconfigure``.

    Args:
        serve_config: the resolved ``ServeConfig`` as a dict (re-validated here).
    """

    def __init__(self, serve_config: dict[str, Any]):
        import faiss
        import torch

        self.config = ServeConfig.model_validate(serve_config)
        threads = max(1, math.floor(self.config.num_cpus))  # the replica's CPU share
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        self._set_batching(self.config.max_batch_size, self.config.batch_wait_timeout_s)
        self._retriever: Retriever | None = None
        self._rollout_error: str | None = None

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        for method in (self._recommend_batch, self._score_batch):
            method.set_max_batch_size(max_batch_size)
            method.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load ``user_config["run_dir"]`` and swap it in; on any error keep the old one.

        A rollout that does not load (missing files, an index built for another model) is
        logged and reported by ``GET /version`` as ``rollout_error`` while the previous
        run keeps serving: raising here would make Serve replace the replica with one that
        fails the same way, and the application would stop answering.

        Raises:
            ValueError / FileNotFoundError: the first run directory does not load (the
                message names the file or the manifest field): nothing to fall back to.
        """
        reload = ReloadConfig.model_validate(user_config)
        try:
            fresh = Retriever(reload.run_dir)  # before the swap: a failure changes nothing
        except (ValueError, FileNotFoundError, OSError) as err:
            if self._retriever is None:
                raise
            self._rollout_error = f"{reload.run_dir}: {err}"
            logger.error("rollout to %s refused, still serving %s: %s", reload.run_dir,
                         self._retriever.model_version, err)
            return
        self._rollout_error = None
        self._set_batching(reload.max_batch_size or self.config.max_batch_size,
                           reload.batch_wait_timeout_s if reload.batch_wait_timeout_s
                           is not None else self.config.batch_wait_timeout_s)
        old, self._retriever = self._retriever, fresh
        logger.info("serving model %s from %s (was %s)", fresh.model_version, fresh.run_dir,
                    old.model_version if old else None)

    def _current(self) -> Retriever:
        if self._retriever is None:
            raise HTTPException(503, "no run directory loaded: the deployment's user_config "
                                "needs {'run_dir': ...}")
        return self._retriever

    def _check_limits(self, body: BaseModel) -> None:
        errors = limit_errors(body, self.config.max_k, self.config.max_history)
        if errors:
            raise RequestValidationError(errors)

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, body: RecommendRequest) -> RecommendResponse:
        """The top k catalogue items for a known user, raw features and/or a history."""
        self._check_limits(body)
        retriever = self._current()
        return await self._recommend_batch(Job(retriever, retriever.encode_recommend(body)))

    @app.post("/score", response_model=ScoreResponse)
    async def score(self, body: ScoreRequest) -> ScoreResponse:
        """The user's score for each given item, in request order."""
        self._check_limits(body)
        retriever = self._current()
        return await self._score_batch(Job(retriever, retriever.encode_score(body)))

    @app.post("/similar-items", response_model=SimilarItemsResponse)
    async def similar_items(self, body: SimilarItemsRequest) -> SimilarItemsResponse:
        """The catalogue items nearest to one item (no user tower: not batched)."""
        self._check_limits(body)
        retriever = self._current()
        return retriever.similar_encoded([retriever.encode_similar(body)])[0]

    @app.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> HealthResponse:
        """Liveness plus the model version being served."""
        return HealthResponse(status="ok", model_version=self._current().model_version)

    @app.get("/version", response_model=VersionResponse)
    async def version(self) -> VersionResponse:
        """Model version, feature-state hash, index summary, run directory, rollout error."""
        return self._current().info().model_copy(update={"rollout_error": self._rollout_error})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _recommend_batch(self, jobs: list[Job]) -> list[RecommendResponse]:
        return run_grouped(jobs, Retriever.recommend_encoded)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def _score_batch(self, jobs: list[Job]) -> list[ScoreResponse]:
        return run_grouped(jobs, Retriever.score_encoded)


def app_config(args: dict[str, Any]) -> tuple[Path, ServeConfig]:
    """Builder args -> (absolute run_dir, the run's saved ServeConfig with the overrides).

    Raises:
        ValueError: run_dir missing, or an argument that is not an overridable field.
        FileNotFoundError: ``RUN_DIR/model/meta.json`` is missing.
    """
    args = dict(args)
    if not args.get("run_dir"):
        raise ValueError("build_app needs run_dir=RUN_DIR (a run with model/, index/ and "
                         "prepared/)")
    run_dir = Path(str(args.pop("run_dir"))).resolve()
    accepted = [f for f in ServeConfig.model_fields if f not in NOT_OVERRIDABLE]
    unknown = sorted(set(args) - set(accepted))
    if unknown:
        raise ValueError(f"build_app args {unknown} are not accepted; accepted: run_dir, "
                         f"{', '.join(accepted)} (host / port go in http_options: "
                         "run_app or python -m serve_app.deploy_config)")
    saved = read_model_meta(RunDir(run_dir).model).config.serve.model_dump(mode="json")
    return run_dir, ServeConfig.model_validate({**saved, **args})


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    """The serve config's HTTP fields as Serve's ``http_options`` (``serve.start``, YAML)."""
    return {"host": cfg.host, "port": cfg.port}


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Replicas (fixed or autoscaling), CPUs and queue depth from the serve config."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.num_cpus},
        # room for a full batch to run while the next one fills
        "max_ongoing_requests": max(2 * cfg.max_batch_size,
                                    math.ceil(2 * cfg.target_ongoing_requests)),
    }
    if cfg.autoscaling:
        opts["autoscaling_config"] = {"min_replicas": cfg.min_replicas,
                                      "max_replicas": cfg.max_replicas,
                                      "target_ongoing_requests": cfg.target_ongoing_requests}
    else:
        opts["num_replicas"] = cfg.num_replicas
    return opts


def build_app(args: dict[str, Any]) -> Application:
    """Application builder: ``serve run serve_app.app:build_app run_dir=RUN_DIR [k=v ...]``.

    Args:
        args: ``run_dir`` (required) and optional ``ServeConfig`` overrides
            (num_replicas, autoscaling, min_replicas, max_replicas,
            target_ongoing_requests, num_cpus, max_batch_size, batch_wait_timeout_s,
            max_k, max_history); strings are parsed as the field's type.

    Returns:
        The bound deployment; its ``user_config`` is ``{"run_dir": RUN_DIR}``.
    """
    return bind_app(*app_config(args))


def bind_app(run_dir: Path, cfg: ServeConfig) -> Application:
    """The deployment bound with ``cfg``'s options and ``user_config={"run_dir": ...}``."""
    return RetrievalDeployment.options(
        **deployment_options(cfg), user_config={"run_dir": str(run_dir)},
    ).bind(cfg.model_dump(mode="json"))


def run_app(run_dir: str | Path, overrides: dict[str, Any] | None = None,
            name: str = APP_NAME, route_prefix: str = "/") -> ServeConfig:
    """Start Serve on the run's ``serve.host`` / ``serve.port`` and run the application.

    Joins Ray as ``serve.start`` does. An already running Serve keeps its HTTP options
    (Serve logs a warning that the new ones are ignored): one proxy serves every app.

    Args:
        run_dir: a run directory with model/, index/ and prepared/.
        overrides: any ``ServeConfig`` field, host and port included (strings are parsed
            as the field's type).
        name: the application name.
        route_prefix: the application's HTTP route prefix.

    Returns:
        The resolved serve config, host and port as passed to ``serve.start``.

    Raises:
        ValueError: an override that is not a ``ServeConfig`` field or not a valid value.
    """
    overrides = dict(overrides or {})
    http = {k: overrides.pop(k) for k in NOT_OVERRIDABLE if k in overrides}
    resolved_dir, cfg = app_config({"run_dir": str(run_dir), **overrides})
    cfg = ServeConfig.model_validate({**cfg.model_dump(mode="json"), **http})
    serve.start(http_options=http_options(cfg))
    serve.run(bind_app(resolved_dir, cfg), name=name, route_prefix=route_prefix)
    return cfg
