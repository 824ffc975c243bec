"""Serving: request encoding without skew, exact answers, errors, version guard, rollout.

Logic is tested in-process on a :class:`Retriever`; the HTTP tests share one deployment
(``run_app``: Serve started on a free 127.0.0.1 port of the session's Ray), and the
rollout test deploys ``configs/serve.yaml`` as a second application. The oracles are
numpy over the batch job's files (``embeddings/*/model_version=V``), not the serving code.
"""

from __future__ import annotations

import copy
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, demo_config

APP, ROLLOUT_APP = "towerline", "towerline-rollout"
HTTP_TIMEOUT = 30.0


# -- fixtures -----------------------------------------------------------------------------

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
def server(ray_session, demo_trained):
    """One live deployment over HTTP; Serve is shut down (never `ray stop`) at module end."""
    import httpx
    from ray import serve

    from serve_app.app import run_app

    port = free_port()
    cfg = run_app(demo_trained, {"host": "127.0.0.1", "port": str(port)}, name=APP)
    assert (cfg.host, cfg.port) == ("127.0.0.1", port)  # the requests below go there
    client = httpx.Client(base_url=f"http://{cfg.host}:{cfg.port}", timeout=HTTP_TIMEOUT)
    try:
        yield client
    finally:
        client.close()
        serve.shutdown()


# -- oracles ------------------------------------------------------------------------------

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


# -- in-process: encoding is prepare's encoding --------------------------------------------

def test_known_user_alone_gives_the_stored_row(retriever, users):
    from serve_app.schemas import RecommendRequest

    uid = next(iter(users))
    encoded = retriever.encoder.encode(RecommendRequest(user_id=uid))
    for column, value in encoded.columns.items():
        np.testing.assert_array_equal(value[0], np.asarray(users[uid][column]), column)
    assert encoded.seen.tolist() == sorted(set(users[uid]["seen_item_index"]))


def test_raw_features_and_history_encode_exactly_like_prepare(retriever, users, demo_data):
    """A request carrying a user's raw table values and raw history reproduces its row."""
    from serve_app.schemas import RecommendRequest

    raw_users = {r["user_id"]: r for r in pads.dataset(str(demo_data / "users")).to_table()
                 .to_pylist()}
    uid = next(u for u in users if u in raw_users and len(users[u]["seen_item_index"]) > 3)
    features = {k: v for k, v in raw_users[uid].items() if k != "user_id"}
    history = [retriever.item_ids[r] for r in users[uid]["seen_item_index"]]
    encoded = retriever.encoder.encode(RecommendRequest(features=features, history=history))
    for column, value in encoded.columns.items():
        if column != "user__user_id":  # anonymous: the id feature is padding
            np.testing.assert_array_equal(value[0], np.asarray(users[uid][column]), column)
    assert encoded.columns["user__user_id"].tolist() == [0]
    # with the id too, the whole row and so the embedding are the stored user's
    full = retriever.user_embeddings([RecommendRequest(user_id=uid, features=features,
                                                       history=history)])
    stored = retriever.user_embeddings([RecommendRequest(user_id=uid)])
    np.testing.assert_allclose(full, stored, atol=1e-6)


def test_cold_start_takes_the_oov_and_padding_rows(retriever):
    from pipeline.transforms import OOV, PAD
    from serve_app.schemas import RecommendRequest

    known = retriever.item_ids[0]
    req = RecommendRequest(user_id="no-such-user", features={"country": "Atlantis"},
                           history=[known, "no-such-item", 10**12], k=5)
    cols = retriever.encoder.encode(req).columns
    assert cols["user__user_id"].tolist() == [OOV]  # unknown id
    assert cols["user__country"].tolist() == [OOV]  # unseen category
    assert cols["user__gender"].tolist() == [PAD]  # not given, unknown user: null
    assert cols["user__age__missing"].tolist() == [1.0]
    history, category = cols["user__history"][0], cols["user__history__category"][0]
    assert history[-2:].tolist() == [OOV, OOV] and (history[:-3] == PAD).all()
    assert history[-3] >= 2  # the catalogue item is in the sequence vocabulary
    known_category = retriever.encoder.item_features["category"][0]
    assert category[-3:].tolist() == [known_category, PAD, PAD]
    answer = retriever.recommend([req])[0]
    assert len(answer.items) == 5 and known not in [i.item_id for i in answer.items]


def test_user_embedding_equals_the_batch_jobs(retriever, batch_embeddings, demo_trained):
    from serve_app.schemas import RecommendRequest

    uids = sample_test_users(demo_trained, 16)
    got = retriever.user_embeddings([RecommendRequest(user_id=u) for u in uids])
    want = np.stack([batch_embeddings["users"][u] for u in uids])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_batched_answers_equal_one_by_one(retriever, demo_trained):
    from serve_app.schemas import RecommendRequest

    reqs = [RecommendRequest(user_id=u, k=3 + i % 5, exclude_seen=i % 2 == 0)
            for i, u in enumerate(sample_test_users(demo_trained, 12, seed=1))]
    together = retriever.recommend(reqs)
    for req, got in zip(reqs, together, strict=True):
        alone = retriever.recommend([req])[0]
        assert [i.item_id for i in got.items] == [i.item_id for i in alone.items]
        assert len(got.items) == req.k


def test_version_guard_refuses_an_index_of_another_model(tampered_run):
    from serve_app.retriever import Retriever

    with pytest.raises(ValueError, match="model_version='not-this-model'"):
        Retriever(tampered_run)


def test_builder_reads_the_runs_serve_config_and_overrides(demo_trained):
    from serve_app.app import app_config, deployment_options

    run_dir, cfg = app_config({"run_dir": str(demo_trained), "num_replicas": "2",
                               "max_batch_size": "8"})
    assert run_dir == demo_trained.resolve()
    assert (cfg.num_replicas, cfg.max_batch_size, cfg.max_k) == (2, 8, 1000)
    opts = deployment_options(cfg)
    assert opts["num_replicas"] == 2 and opts["ray_actor_options"] == {"num_cpus": 0.5}
    auto = deployment_options(app_config({"run_dir": str(demo_trained),
                                          "autoscaling": "true", "max_replicas": 3})[1])
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ValueError, match="port"):
        app_config({"run_dir": str(demo_trained), "port": 9000})
    with pytest.raises(ValueError, match="run_dir"):
        app_config({"num_replicas": 1})


def test_http_options_carry_the_serve_configs_host_and_port():
    from ray.serve.config import HTTPOptions

    from pipeline.config.serve import ServeConfig
    from serve_app.app import NOT_OVERRIDABLE, http_options

    opts = http_options(ServeConfig(host="10.0.0.5", port=9001))
    assert opts == {"host": "10.0.0.5", "port": 9001}
    assert set(opts) == set(NOT_OVERRIDABLE)  # what builder args refuse, Serve gets here
    assert (HTTPOptions(**opts).host, HTTPOptions(**opts).port) == ("10.0.0.5", 9001)


def test_run_app_refuses_a_bad_override_before_starting_serve(demo_trained):
    from serve_app.app import run_app

    with pytest.raises(ValueError, match="port"):
        run_app(demo_trained, {"port": 0})
    with pytest.raises(ValueError, match=r"\['colour'\] are not accepted"):
        run_app(demo_trained, {"colour": "red"})


@pytest.fixture
def run_on_port_9123(demo_trained, demo_data, tmp_path):
    """A run whose model/meta.json holds a config with serve.host / serve.port overridden."""
    from pipeline.run_dir import META_FILE, RunDir, read_model_meta, write_json

    cfg = demo_config(demo_data, "serve.port=9123", "serve.host=0.0.0.0")
    meta = read_model_meta(RunDir(demo_trained).model).model_copy(update={"config": cfg})
    run = RunDir(tmp_path / "run")
    run.model.mkdir(parents=True)
    write_json(run.model / META_FILE, meta.model_dump(mode="json"))
    return run.root


def test_deploy_config_carries_the_runs_host_and_port(run_on_port_9123, tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    from serve_app.deploy_config import main

    out = tmp_path / "deploy.yaml"
    assert main([str(run_on_port_9123), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "http://127.0.0.1:9123"  # 0.0.0.0, reached locally
    written = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(written)
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 9123)
    assert schema.applications[0].args == {"run_dir": str(run_on_port_9123.resolve())}
    template = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    template["http_options"].update(host="0.0.0.0", port=9123)
    template["applications"][0]["args"]["run_dir"] = str(run_on_port_9123.resolve())
    assert written == template  # nothing else of the template changes


def test_deploy_config_names_a_run_without_a_model(tmp_path, capsys):
    from serve_app.deploy_config import main

    assert main([str(tmp_path)]) == 1
    assert "meta.json is missing" in capsys.readouterr().err


def test_serve_yaml_is_a_valid_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == (
        "towerline", "/", "serve_app.app:build_app")
    assert Path(app.args["run_dir"]).is_absolute()
    assert not (app.runtime_env or {}).get("working_dir")
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    assert [d.name for d in app.deployments] == ["Retrieval"]


# -- over HTTP ----------------------------------------------------------------------------

def test_every_endpoint_answers(server, demo_trained, batch_embeddings):
    health = server.get("/healthz").json()
    version = server.get("/version").json()
    assert health["status"] == "ok" and health["model_version"] == version["model_version"]
    assert version["run_dir"] == str(demo_trained.resolve())
    assert version["index"]["item_count"] == len(batch_embeddings["item_ids"])
    assert version["index"]["index_type"] == "Flat"
    paths = server.get("/openapi.json").json()["paths"]
    assert {"/recommend", "/similar-items", "/score", "/healthz", "/version"} <= set(paths)
    assert server.get("/docs").status_code == 200

    item_ids, items = batch_embeddings["item_ids"], batch_embeddings["items"]
    similar = server.post("/similar-items", json={"item_id": item_ids[3], "k": 5}).json()
    rows, scores = exact_top_k(items[3], items, [3], 5)
    assert ids_of(similar) == [item_ids[r] for r in rows]
    np.testing.assert_allclose([e["score"] for e in similar["items"]], scores, atol=1e-5)


def test_recommend_is_the_exact_offline_ranking(server, demo_trained, users, batch_embeddings):
    item_ids, items = batch_embeddings["item_ids"], batch_embeddings["items"]
    row_of = {item: row for row, item in enumerate(item_ids)}
    for i, uid in enumerate(sample_test_users(demo_trained, 8)):
        exclude_seen = i % 3 != 2
        extra = [item_ids[i]]  # one explicit exclusion per user
        body = {"user_id": uid, "k": 10, "exclude_seen": exclude_seen, "exclude_items": extra}
        got = server.post("/recommend", json=body).json()
        seen = users[uid]["seen_item_index"] if exclude_seen else []
        rows, scores = exact_top_k(batch_embeddings["users"][uid], items,
                                   [*seen, row_of[extra[0]]], 10)
        assert ids_of(got) == [item_ids[r] for r in rows], uid
        np.testing.assert_allclose([e["score"] for e in got["items"]], scores, atol=1e-5)
        scored = server.post("/score", json={"user_id": uid, "item_ids": ids_of(got)}).json()
        assert ids_of(scored, "scores") == ids_of(got)
        np.testing.assert_allclose([e["score"] for e in scored["scores"]], scores, atol=1e-5)


def test_concurrent_requests_get_their_own_answers(server, retriever, demo_trained):
    from serve_app.schemas import RecommendRequest

    uids = sample_test_users(demo_trained, 16, seed=2)
    want = [[i.item_id for i in r.items]
            for r in retriever.recommend([RecommendRequest(user_id=u, k=4) for u in uids])]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda u: server.post("/recommend",
                                                  json={"user_id": u, "k": 4}).json(), uids))
    assert [ids_of(g) for g in got] == want


def test_cold_start_over_http(server, retriever):
    bodies = [{"user_id": "someone-new", "features": {"age": 30, "country": "Atlantis"}},
              {"history": ["no-such-item", 10**12], "k": 3},
              {"features": {"gender": "never-seen", "signup_days": None}, "k": 2}]
    for body in bodies:
        r = server.post("/recommend", json=body)
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == body.get("k", 10)


BAD_REQUESTS = [  # (path, body, status, field named, value named)
    ("/recommend", {"user_id": 1, "k": "ten"}, 422, "k", None),
    ("/recommend", {"user_id": [1]}, 422, "user_id", None),
    ("/recommend", {"user_id": 1, "exclude_seen": "maybe"}, 422, "exclude_seen", None),
    ("/recommend", {"k": 5}, 422, "user_id", None),
    ("/recommend", {"user_id": 1, "colour": "red"}, 422, "colour", None),
    ("/recommend", {"user_id": 1, "k": 0}, 422, "k", 0),
    ("/recommend", {"user_id": 1, "k": 1001}, 422, "k", 1001),
    ("/recommend", {"user_id": 1, "history": [1] * 1001}, 422, "history", None),
    ("/recommend", {"user_id": 1, "features": {"age": "old"}}, 422, "age", "old"),
    ("/recommend", {"user_id": 1, "features": {"shoe_size": 44}}, 422, "shoe_size", None),
    ("/similar-items", {"k": 3}, 422, "item_id", None),
    ("/similar-items", {"item_id": 987654}, 404, "item_id", 987654),
    ("/score", {"user_id": 1, "item_ids": [1, 987654]}, 404, "item_ids", 987654),
    ("/score", {"user_id": 1, "item_ids": []}, 422, "item_ids", None),
]


@pytest.mark.parametrize("path,body,status,field,value", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, field, value):
    assert_names(server.post(path, json=body), status, field, value)
    assert server.post("/recommend", json={"user_id": 1, "k": 2}).status_code == 200


def test_reconfigure_to_a_bad_run_keeps_the_old_one_serving(server, tampered_run):
    from ray import serve

    before = server.get("/version").json()
    assert before["rollout_error"] is None
    handle = serve.get_deployment_handle("Retrieval", app_name=APP)
    handle.reconfigure.remote({"run_dir": str(tampered_run)}).result(timeout_s=60)
    after = server.get("/version").json()
    assert str(tampered_run) in after["rollout_error"]
    assert "model_version" in after["rollout_error"]
    assert {k: v for k, v in after.items() if k != "rollout_error"} == {
        k: v for k, v in before.items() if k != "rollout_error"}
    assert server.post("/recommend", json={"user_id": 1}).status_code == 200
    # a good rollout afterwards clears the error
    handle.reconfigure.remote({"run_dir": before["run_dir"]}).result(timeout_s=60)
    assert server.get("/version").json()["rollout_error"] is None


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


def test_rollout_through_user_config_fails_no_request(server, demo_trained, tmp_path):
    """`serve deploy` with a new user_config.run_dir: replicas reconfigure in place."""
    import httpx
    from ray import serve

    second = tmp_path / "second-run"
    shutil.copytree(demo_trained, second, ignore=shutil.ignore_patterns("train", "validation"))
    port = server.base_url.port
    # what `serve deploy` sends; the dashboard REST API is not started in tests
    client = serve.context._get_global_client()
    client.deploy_apps(deploy_config(demo_trained, port), _blocking=True)
    statuses: list[tuple[bool, int]] = []  # (sent after the switch was seen, status)
    switched = threading.Event()

    def traffic() -> None:  # its own client; bounded: stops 10 requests after the switch
        with httpx.Client(base_url=server.base_url, timeout=HTTP_TIMEOUT) as own:
            for i in range(400):
                after = switched.is_set()
                r = own.post("/rollout/recommend", json={"user_id": 1 + i % 50, "k": 5})
                statuses.append((after, r.status_code))
                if sum(a for a, _ in statuses) >= 10:
                    return

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        while len(statuses) < 5 and thread.is_alive():
            time.sleep(0.02)
        client.deploy_apps(deploy_config(demo_trained, port, {"run_dir": str(second)}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not switched.is_set():
            if server.get("/rollout/version").json()["run_dir"] == str(second.resolve()):
                switched.set()
            time.sleep(0.1)
        observed = switched.is_set()
        thread.join(timeout=120)
    finally:
        switched.set()
        serve.delete(ROLLOUT_APP)
    assert observed, "the rollout app never reported the second run_dir"
    assert server.get("/version").json()["run_dir"] == str(demo_trained.resolve())
    before = [code for after, code in statuses if not after]
    after = [code for after, code in statuses if after]
    assert len(before) >= 5 and len(after) == 10, (len(before), len(after))
    assert set(before + after) == {200}


def test_check_tool_accepts_a_good_run_and_names_the_bad_field(demo_trained, tampered_run,
                                                                 capsys):
    from serve_app.check import main

    assert main([str(demo_trained)]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(demo_trained.resolve())
    assert main([str(tampered_run)]) == 1
    assert "model_version='not-this-model'" in capsys.readouterr().err
