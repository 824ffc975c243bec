"""The Ray Serve retrieval deployment and its application builder.

Endpoints (OpenAPI docs at ``/docs``, built per replica by :mod:`serve_app.api`):
``POST /recommend``, ``POST /similar-items``, ``POST /score``, ``POST /events``,
``GET /healthz``, ``GET /version``. Bodies are in :mod:`serve_app.schemas`. Users are read
from the user-state store (:mod:`serve_app.user_store`), which ``/events`` appends to.

Ingress: the run's ``serve.ingress`` (default ``haproxy``: Serve's bundled HAProxy on
``serve.host:serve.port`` in front of each replica's own HTTP server) is applied when Ray
starts; :mod:`serve_app.environment` has the modes, what they cost and their settings.

Batching (``serve.batching``): each request is validated and encoded on its own (a bad one
gets its 4xx and never joins a batch); the user embeddings (stored ones for known users
sent without overrides, one tower forward for the rest) and the index search then run once
for all requests queued together, via :class:`~serve_app.batching.MicroBatcher`
(``serve.max_batch_size``, ``serve.batch_wait_timeout_s``; 0 batches what queued while the
previous batch ran, so a lone request never waits). It keeps ``@serve.batch``'s contract
at a fraction of its cost per request (measured in that module's docstring).

The batch runs on the replica's event loop, not in a worker thread: measured on the demo
run behind HAProxy (2 cores shared with other work), the hop to a thread and back cost more
than it freed the loop for. With the thread: p50 4.0 ms at concurrency 1, 478 and 351
req/s at 16 and 64; on the loop: 2.1 ms, 749 and 756 req/s (README, "Serving latency").
Loading a run (seconds of file reads) is what goes to a thread: see ``reconfigure``.

Rollout: the run directory is the deployment's ``user_config`` (``{"run_dir": ...}``).
``reconfigure`` (a coroutine, so it runs on the replica's event loop) loads the new
:class:`~serve_app.retriever.Retriever` in a worker thread, then, back on the loop, applies
the batching settings and swaps it in with one assignment; a request keeps the retriever it
was encoded with until it is answered, so a rollout fails no request and never mixes two
versions in one answer. Any failure to load (a missing or truncated file, a foreign index,
a reordered catalogue, anything raised) leaves the old retriever serving: it is logged with
its traceback and ``GET /version`` shows ``rollout.status = "refused"``. Each run that
loads is recorded beside the runs (``.towerline-last-good.json`` in their folder), so a
replica that starts later (a crash, an OOM, a scale-up) while the configured run does not
load serves that last good run, still ``refused``, instead of failing; only a first load
with nothing to fall back to raises (the deployment refuses to start). Check a run with
``python -m jobs.check RUN_DIR`` before pointing ``user_config`` at it.

    python -m jobs.deploy_config RUN_DIR --out serve.yaml  # host / port of the run
    serve deploy serve.yaml                                      # or: serve run serve.yaml
    serve run serve_app.app:build_app run_dir=/abs/path/RUN_DIR [num_replicas=2 ...]  # *:8000

HTTP: the run's ``serve.host`` / ``serve.port`` are Serve's ``http_options``, set when
Serve starts, for every application on the node: :func:`run_app` (in code) passes them to
``serve.start``, and :mod:`serve_app.deploy_config` writes them into the deploy YAML. A
bare ``serve run serve_app.app:build_app`` uses Serve's defaults: 127.0.0.1:8000, but with
the HAProxy ingress every interface (``*:8000``), so the docs serve through the YAML.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException
from ray import serve
from ray.serve import Application

from pipeline.config.serve import ServeConfig
from pipeline.run_dir import RunDir, read_model_meta
from serve_app import environment
from serve_app.api import build_api
from serve_app.batching import MicroBatcher
from serve_app.last_good import read_last_good, write_last_good
from serve_app.queries import Answer
from serve_app.retriever import Retriever
from serve_app.schemas import (
    EventsResponse,
    HealthResponse,
    ReloadConfig,
    RolloutStatus,
    VersionResponse,
)
from towers.exported import WEIGHTS_ONLY_ENV

logger = logging.getLogger("ray.serve")
DEPLOYMENT = "Retrieval"
APP_NAME = "towerline"  # the application's name in configs/serve.yaml
# Serve's HTTP front is shared by every application on a node: host / port / ingress are
# applied when Serve (or Ray) starts, never as an application's builder argument.
NOT_OVERRIDABLE = ("host", "port", "ingress")
# A swapped-out retriever's user store (an LMDB map, a Redis pool) is closed this long after
# the swap: far longer than any request it encoded can take to be answered.
RETIRE_AFTER_S = 120.0


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
@serve.ingress()
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
        self._recommend_batch = MicroBatcher(
            lambda jobs: run_grouped(jobs, Retriever.recommend_encoded))
        self._score_batch = MicroBatcher(lambda jobs: run_grouped(jobs, Retriever.score_encoded))
        self._set_batching(self.config.max_batch_size, self.config.batch_wait_timeout_s)
        self._retriever: Retriever | None = None
        self._refused_at: str | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve's hook: this replica's FastAPI app, with the config's request bounds."""
        return build_api(self, self.config)

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        for batcher in (self._recommend_batch, self._score_batch):
            batcher.configure(max_batch_size, batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load ``user_config["run_dir"]`` and swap it in; on any error keep the old one.

        A coroutine on purpose: Serve 2.60 runs a plain ``def reconfigure`` in a thread
        pool (``RAY_SERVE_RUN_SYNC_IN_THREADPOOL``), where changing the batch settings
        and swapping the retriever would race the event loop that batches requests. Here
        only the load runs in a thread; the settings and the swap happen on the loop.

        A run that loads is recorded as the last good one, beside it (:func:`write_last_good`).
        A replica that starts (a restart after a crash or an OOM, a scale-up) while the
        configured run does not load serves that last good run instead, with
        ``rollout.status: "refused"``: a refused rollout never becomes an outage.

        Raises:
            Exception: the first run directory does not load and no other run has loaded
                beside it (nothing to fall back to; the message names the file or field).
        """
        wanted = str((user_config or {}).get("run_dir"))
        try:
            reload = ReloadConfig.model_validate(user_config)
            fresh = await self._load(reload.run_dir)
        except Exception as err:  # noqa: BLE001 - any failure: keep serving what loads
            if self._retriever is None:
                fallback = read_last_good(wanted) if (user_config or {}).get("run_dir") \
                    else None
                try:
                    previous = await self._load(fallback) if fallback else None
                except Exception:  # noqa: BLE001 - it no longer loads either
                    previous = None
                if previous is None:
                    raise err from None
                logger.error("run %s does not load (%s: %s); this replica starts with the "
                             "last run that loaded, %s", wanted, type(err).__name__, err,
                             fallback)
                self._swap(previous, ReloadConfig(run_dir=fallback))
            else:
                logger.exception("rollout to %s refused, still serving model %s from %s",
                                 wanted, self._retriever.model_version,
                                 self._retriever.run_dir)
            self._refused_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            return
        self._refused_at = None
        self._swap(fresh, reload)
        write_last_good(fresh.run_dir)

    async def _load(self, run_dir: str) -> Retriever:
        """A :class:`Retriever` of ``run_dir``, loaded in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(
            None, Retriever, run_dir, self.config)

    def _swap(self, fresh: Retriever, reload: ReloadConfig) -> None:
        """Apply ``reload``'s batching settings and serve ``fresh`` (on the event loop)."""
        self._set_batching(reload.max_batch_size or self.config.max_batch_size,
                           reload.batch_wait_timeout_s if reload.batch_wait_timeout_s
                           is not None else self.config.batch_wait_timeout_s)
        old, self._retriever = self._retriever, fresh
        logger.info("serving model %s from %s (was %s)", fresh.model_version, fresh.run_dir,
                    old.model_version if old else None)
        self._replay(fresh)
        if old is not None:  # its requests in flight keep it a while; then its store goes
            asyncio.get_running_loop().call_later(RETIRE_AFTER_S, old.store.close)

    @staticmethod
    def _replay(retriever: Retriever) -> None:
        """Apply the events log files the new store has not seen, on the event loop.

        Events posted while the new run loaded went to the old store and the log; an event
        is handled on this loop without a pause, so after the swap every file an event of
        this replica wrote is listed here. Replicas share the log and the store, and each
        replays after its own swap: a file is applied once, by whichever comes first.
        """
        try:
            applied = retriever.replay()
        except Exception:  # noqa: BLE001 - the store is down: the next swap replays
            logger.exception("replaying the events log into model %s's store failed",
                             retriever.model_version)
            return
        if applied:
            logger.info("replayed %d logged events into model %s's store", applied,
                        retriever.model_version)

    def _current(self) -> Retriever:
        if self._retriever is None:
            raise HTTPException(503, "no run directory loaded: the deployment's user_config "
                                "needs {'run_dir': ...}")
        return self._retriever

    # -- what the routes call (serve_app.api.Service) ----------------------------------

    async def recommend(self, body: Any) -> bytes:
        """The top k catalogue items for a user, as the JSON body."""
        retriever = self._current()
        job = Job(retriever, retriever.encode_recommend(body))
        if self.config.batching:
            answer: Answer = await self._recommend_batch.submit(job)
        else:
            answer = run_grouped([job], Retriever.recommend_encoded)[0]
        return answer.to_json()

    async def score(self, body: Any) -> bytes:
        """The user's score for each given item, in request order, as the JSON body."""
        retriever = self._current()
        job = Job(retriever, retriever.encode_score(body))
        if self.config.batching:
            answer: Answer = await self._score_batch.submit(job)
        else:
            answer = run_grouped([job], Retriever.score_encoded)[0]
        return answer.to_json()

    async def similar_items(self, body: Any) -> bytes:
        """The catalogue items nearest to one item (no user tower: not batched)."""
        retriever = self._current()
        job = Job(retriever, retriever.encode_similar(body))
        return run_grouped([job], Retriever.similar_encoded)[0].to_json()

    async def events(self, body: Any) -> EventsResponse:
        """Log events and append them to the user-state store (no await: a swap waits)."""
        return self._current().post_events(body)

    async def health(self) -> HealthResponse:
        """Liveness plus the model version being served."""
        return HealthResponse(status="ok", model_version=self._current().model_version)

    async def version(self) -> VersionResponse:
        """Model version, feature-state hash, index summary and the last rollout's status."""
        status = RolloutStatus(status="refused", refused_at=self._refused_at) \
            if self._refused_at else RolloutStatus(status="ok")
        return self._current().info().model_copy(update={"rollout": status})

    def run_schemas(self) -> tuple[str, dict[str, dict[str, Any]]]:
        """(model version, the run's per-run JSON schemas) for OpenAPI.

        ``features`` / ``filter`` from the request contract, and under ``Event`` the key
        types ``/events`` accepts for this run.
        """
        retriever = self._current()
        return retriever.model_version, {**retriever.contract.openapi(),
                                         "Event": retriever.event_key_schemas()}


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
                         "run_app or python -m jobs.deploy_config; the ingress is "
                         "chosen when Ray starts: python -m jobs.environment)")
    saved = read_model_meta(RunDir(run_dir).model).config.serve.model_dump(mode="json")
    return run_dir, ServeConfig.model_validate({**saved, **args})


def http_options(cfg: ServeConfig) -> dict[str, Any]:
    """The serve config's HTTP fields as Serve's ``http_options`` (``serve.start``, YAML)."""
    return {"host": cfg.host, "port": cfg.port}


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Replicas (fixed or autoscaling), CPUs and queue depth from the serve config."""
    opts: dict[str, Any] = {
        # no torch.load in the replica may fall back to pickle (towers.exported)
        "ray_actor_options": {"num_cpus": cfg.num_cpus,
                              "runtime_env": {"env_vars": dict(WEIGHTS_ONLY_ENV)}},
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


def use_ingress(mode: environment.Ingress) -> None:
    """Select ``mode`` for a Ray this process is about to start; warn if it is too late.

    Serve reads the mode from the environment of the processes Ray starts, so it applies
    only when this process starts Ray (variables the user exported win). A Ray already
    running keeps the mode it started with.
    """
    import ray

    if ray.is_initialized():
        if environment.current() is not mode:
            logger.warning("serve.ingress=%s is not applied: Ray is already running (its "
                           "mode was set when it started; see python -m jobs.environment)",
                           mode.value)
        return
    for name, value in environment.ingress_env(mode).items():
        os.environ.setdefault(name, value)


def run_app(run_dir: str | Path, overrides: dict[str, Any] | None = None,
            name: str = APP_NAME, route_prefix: str = "/") -> ServeConfig:
    """Start Serve on the run's ``serve.host`` / ``serve.port`` and run the application.

    Starts Ray with the run's ``serve.ingress`` unless Ray is already running in this
    process, then joins it as ``serve.start`` does. An already running Serve keeps its
    HTTP options (Serve logs a warning that the new ones are ignored): one front serves
    every app.

    Args:
        run_dir: a run directory with model/, index/ and prepared/.
        overrides: any ``ServeConfig`` field, host, port and ingress included (strings are
            parsed as the field's type).
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
    use_ingress(cfg.ingress)
    start_serve(http_options(cfg))
    serve.run(bind_app(resolved_dir, cfg), name=name, route_prefix=route_prefix)
    return cfg


def start_serve(options: dict[str, Any], attempts: int = 3) -> None:
    """``serve.start``, again when its HTTP front was replaced while starting.

    On a loaded machine the HTTP front (HAProxy's manager actor) can miss three health
    checks while it starts; the controller then replaces it, and ``serve.start``, which
    waits on the first one, raises ``ActorDiedError`` although the replacement comes up.
    A second call joins the running controller.
    """
    import ray

    for attempt in range(1, attempts + 1):
        try:
            serve.start(http_options=options)
            return
        except ray.exceptions.ActorDiedError:
            if attempt == attempts:
                raise
            logger.warning("Serve's HTTP front was replaced while starting (attempt %d of "
                           "%d); joining the running controller", attempt, attempts)
