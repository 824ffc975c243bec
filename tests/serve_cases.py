"""The serving tests' shared fixtures and oracles (``tests/test_serve*.py``).

One trained demo run, its batch embeddings and a tampered copy; the HTTP deployment
(``run_app`` on a free 127.0.0.1 port of the session's Ray, behind the HAProxy ingress as
shipped); a second model version and the corrupt runs the rollout tests deploy. The oracles
are numpy over the batch job's files and the catalogue, not the serving code.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, demo_config

APP, ROLLOUT_APP = "towerline", "towerline-rollout"


HTTP_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def retriever(demo_trained):
    from serve_app.retriever import Retriever

    return Retriever(demo_trained)


@pytest.fixture(scope="module")
def users(demo_trained):
    """prepared/users.parquet as Python rows keyed by user id."""
    table = pq.read_table(demo_trained / "prepared" / "users.parquet")
    return {row["user_id"]: row for row in table.to_pylist()}


@pytest.fixture(scope="module")
def batch_embeddings(demo_trained):
    """The batch job's user and item embeddings of the served model version."""
    from indexing.embed import read_embeddings
    from pipeline.run_dir import RunDir, read_model_meta

    version = read_model_meta(demo_trained / "model").model_version
    run = RunDir(demo_trained)
    keys, _, user_emb = read_embeddings(run.embeddings("user", version), "user_id")
    item_ids, _, item_emb = read_embeddings(run.embeddings("item", version),
                                            "item_id")
    return {"users": dict(zip(keys.tolist(), user_emb, strict=True)),
            "item_ids": item_ids.tolist(), "items": item_emb}


@pytest.fixture(scope="module")
def tampered_run(demo_trained, tmp_path_factory):
    """A copy of the run whose index manifest claims another model version."""
    run = tmp_path_factory.mktemp("tampered") / "run"
    shutil.copytree(demo_trained, run)
    path = run / "index" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model_version"] = "not-this-model"
    path.write_text(json.dumps(manifest))
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_run(demo_trained, tmp_path_factory) -> Path:
    """A copy of the demo run for the live deployment: fuzzed /events write into its store."""
    dst = tmp_path_factory.mktemp("served") / "run"
    shutil.copytree(demo_trained, dst)
    return dst


@pytest.fixture(scope="module")
def server(ray_session, served_run, second_model):
    """One live deployment over HTTP; Serve is shut down (never `ray stop`) at module end.

    ``second_model`` is built first: its index build (Ray Data) needs the CPUs that the
    replica would hold.
    """
    import httpx
    from ray import serve

    from serve_app.app import run_app

    port = free_port()
    cfg = run_app(served_run, {"host": "127.0.0.1", "port": str(port)}, name=APP)
    assert (cfg.host, cfg.port) == ("127.0.0.1", port)  # the requests below go there
    client = httpx.Client(base_url=f"http://{cfg.host}:{cfg.port}", timeout=HTTP_TIMEOUT)
    deadline = time.monotonic() + 60  # the HTTP front may come up after the app
    while time.monotonic() < deadline:
        try:
            if client.get("/healthz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    try:
        yield client
    finally:
        client.close()
        serve.shutdown()


def exact_top_k(query: np.ndarray, items: np.ndarray, exclude, k: int) -> tuple[list, list]:
    """Brute-force cosine ranking (the demo model's similarity): (rows, scores) best first."""
    unit = items / np.linalg.norm(items, axis=1, keepdims=True)
    scores = unit @ (query / np.linalg.norm(query))
    scores[np.asarray(list(exclude), dtype=np.int64)] = -np.inf
    order = np.argsort(-scores, kind="stable")[:k]
    return order.tolist(), scores[order].tolist()


def sample_test_users(demo_trained, n: int, seed: int = 0) -> list[int]:
    ids = pads.dataset(str(demo_trained / "prepared" / "test")).to_table(["user_id"])
    unique = np.unique(ids["user_id"].to_numpy())
    return np.random.default_rng(seed).choice(unique, n, replace=False).tolist()


def ids_of(response: dict, key: str = "items") -> list:
    return [entry["item_id"] for entry in response[key]]


def assert_names(response, status: int, field: str, value=None) -> None:
    """A 4xx whose detail names ``field`` in a loc (and ``value`` in the message/input)."""
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert any(field in [str(p) for p in d["loc"]] or field in d["msg"] for d in detail), detail
    if value is not None:
        assert any(str(value) in d["msg"] or d.get("input") == value for d in detail), detail


@pytest.fixture(scope="module")
def second_model(demo_prepared, demo_data, tmp_path_factory):
    """A good run of the same data with another seed: a DIFFERENT model version."""
    from jobs import build_index
    from training.loop import run_plain

    run_dir = tmp_path_factory.mktemp("second_model")
    shutil.copytree(demo_prepared / "prepared", run_dir / "prepared")
    cfg = demo_config(demo_data, "train.seed=1")
    run_plain(cfg, run_dir, log=lambda m: None)
    build_index.run(cfg, run_dir)
    return run_dir


def copy_run(src: Path, dst: Path) -> Path:
    """What serving reads of a run (no training splits or checkpoints)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(
        "train", "validation", "test", "mlruns", "plain"))
    return dst


def _truncate_index(run: Path) -> None:
    path = run / "index" / "index.faiss"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _drop_meta_key(run: Path) -> None:
    path = run / "model" / "meta.json"
    meta = json.loads(path.read_text())
    del meta["model_version"]
    path.write_text(json.dumps(meta))


def _drop_user_store(run: Path) -> None:
    (run / "user_state" / "data.mdb").unlink()


def _stale_user_store(run: Path) -> None:
    path = run / "user_state" / "layout.json"
    layout = json.loads(path.read_text())
    path.write_text(json.dumps({**layout, "model_version": "an-older-model"}))


def _reorder_catalogue(run: Path) -> None:
    path = run / "prepared" / "items.parquet"
    table = pq.read_table(path)
    pq.write_table(table.take(np.arange(table.num_rows)[::-1].copy()), path)


def _change_feature_state(run: Path) -> None:
    path = run / "prepared" / "feature_state.json"
    state = json.loads(path.read_text())
    vocab = state["item"]["features"]["category"]["vocab"]
    vocab[0], vocab[1] = vocab[1], vocab[0]  # same size, other meaning
    path.write_text(json.dumps(state))


@pytest.fixture(scope="module")
def corrupt_runs(second_model, tmp_path_factory):
    """Each corruption applied to its own copy of the second (good) run."""
    root = tmp_path_factory.mktemp("corrupt")
    runs = {}
    for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
        runs[name] = copy_run(second_model, root / f"run{i}")
        corrupt(runs[name])
    return runs


CORRUPTIONS = {"truncated index": _truncate_index, "missing meta key": _drop_meta_key,
               "missing user store": _drop_user_store,
               "stale user store": _stale_user_store,
               "reordered catalogue": _reorder_catalogue,
               "mismatched feature state": _change_feature_state}


@pytest.fixture(scope="module")
def raw_items(demo_data, batch_embeddings):
    """Raw category and tags of each catalogue row (the batch job's row order)."""
    table = pads.dataset(str(demo_data / "items")).to_table(["item_id", "category", "tags"])
    by_id = {r["item_id"]: r for r in table.to_pylist()}
    rows = [by_id[i] for i in batch_embeddings["item_ids"]]
    return {"category": [r["category"] for r in rows], "tags": [set(r["tags"] or []) for r in rows]}


def filtered_oracle(user_emb, items, raw, flt, allow_rows, exclude_rows, k):
    """Exact cosine top-k over the rows matching every attribute (any value), numpy."""
    ok = np.ones(len(items), bool)
    for name, values in flt.items():
        have = raw[name]
        ok &= np.array([(v in values) if name == "category" else bool(v & set(values))
                        for v in have])
    if allow_rows is not None:
        ok &= np.isin(np.arange(len(items)), allow_rows)
    ok[list(exclude_rows)] = False
    rows, scores = exact_top_k(user_emb, items, [], len(items))
    kept = [(r, s) for r, s in zip(rows, scores, strict=True) if ok[r]][:k]
    return [r for r, _ in kept], [s for _, s in kept], int(ok.sum())


def deploy_config(run_dir: Path, port: int, user_config: dict | None = None):
    """configs/serve.yaml as a second app on /rollout, optionally with a user_config."""
    from ray.serve.schema import ServeDeploySchema

    raw = copy.deepcopy(yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text()))
    app = raw["applications"][0]
    app.update(name=ROLLOUT_APP, route_prefix="/rollout")
    app["args"]["run_dir"] = str(run_dir)
    if user_config:
        app["deployments"][0]["user_config"] = user_config
    raw["http_options"]["port"] = port
    return ServeDeploySchema.model_validate(raw)


def answers_of(run_dir: Path, bodies: list[dict]) -> tuple[str, list[list]]:
    """A run's model version and its in-process answers (item ids) to ``bodies``."""
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    retriever = Retriever(run_dir)
    got = retriever.recommend([RecommendRequest(**b) for b in bodies])
    return retriever.model_version, [[i.item_id for i in g.items] for g in got]
