"""Serving: request encoding without skew, exact answers, errors, version guard, rollout.

Logic is tested in-process on a :class:`Retriever`; the HTTP tests share one deployment
(``run_app``: Serve started on a free 127.0.0.1 port of the session's Ray, behind the
HAProxy ingress as shipped), and the rollout tests deploy ``configs/serve.yaml`` as a
second application. The oracles are numpy over the batch job's files
(``embeddings/*/model_version=V``) and the catalogue's raw attributes, not the serving code.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
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
    encoded = retriever.encode_user(RecommendRequest(user_id=uid))
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
                           history=["no-such-item", known, 10**12], k=5)
    cols = retriever.encoder.encode(req).columns
    assert cols["user__user_id"].tolist() == [OOV]  # unknown id
    assert cols["user__country"].tolist() == [OOV]  # unseen category
    assert cols["user__gender"].tolist() == [PAD]  # not given, unknown user: null
    assert cols["user__age__missing"].tolist() == [1.0]
    history, category = cols["user__history"][0], cols["user__history__category"][0]
    # ids not in the catalogue are dropped, as prepare drops their interactions: the
    # history is the one known item, most recent last, never an OOV token
    assert history[-1] >= 2 and (history[:-1] == PAD).all() and OOV not in history
    known_category = retriever.encoder.item_features["category"][0]
    assert category[-1] == known_category and (category[:-1] == PAD).all()
    alone = retriever.encoder.encode(RecommendRequest(history=[known])).columns
    assert np.array_equal(alone["user__history"], cols["user__history"])
    answer = retriever.recommend([req])[0]
    assert len(answer.items) == 5 and known not in [i.item_id for i in answer.items]


def test_id_keys_follow_the_prepare_lookup_rule(retriever):
    """"7" finds the integer id 7 as prepare's lookup does; " 7" and full-width do not."""
    from pipeline.transforms import lookup

    item_map = retriever.encoder.item_map
    known = retriever.item_ids[5]
    assert isinstance(known, int)
    full_width = "".join(chr(0xFF10 + int(d)) for d in str(known))
    variants = [known, str(known), f" {known}", full_width, f"+{known}", "x"]
    rows = item_map.rows(variants)
    arrow = lookup(variants[1:2], item_map.index.vocab)[0] - 2  # the Arrow path, alone
    assert rows[0] == rows[1] == arrow == 5
    assert (rows[2:] == -1).all()
    assert [item_map.row(v) for v in variants] == rows.tolist()  # one at a time: the same


def test_user_embedding_equals_the_batch_jobs(batch_embeddings, demo_trained):
    """The exported tower on a stored row gives what the index build wrote for it."""
    from pipeline.config.serve import ServeConfig
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    tower_only = Retriever(demo_trained, ServeConfig(stored_user_embeddings=False))
    assert not tower_only.stored_embeddings
    uids = sample_test_users(demo_trained, 16)
    got = tower_only.user_embeddings([RecommendRequest(user_id=u) for u in uids])
    want = np.stack([batch_embeddings["users"][u] for u in uids])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_known_users_without_overrides_skip_the_tower(retriever, batch_embeddings,
                                                       demo_trained, monkeypatch):
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    calls = []

    def counted(users):
        calls.append(len(users))
        return Retriever.forward(retriever, users)

    monkeypatch.setattr(retriever, "forward", counted)
    uids = sample_test_users(demo_trained, 6, seed=4)
    history = [retriever.item_ids[3], retriever.item_ids[9]]
    requests = [RecommendRequest(user_id=u) for u in uids] + [
        RecommendRequest(user_id=uids[0], history=history),  # overrides: the tower runs
        RecommendRequest(user_id=uids[1], features={"age": 33}),
        RecommendRequest(user_id="someone-new")]
    got = retriever.user_embeddings(requests)
    assert calls == [3]  # one forward, for the three that are not a stored row as it is
    want = np.stack([batch_embeddings["users"][u] for u in uids])
    np.testing.assert_array_equal(got[:6], want)  # the stored vectors themselves
    assert not np.allclose(got[6], want[0], atol=1e-4)  # the new history moved it


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
    assert opts["num_replicas"] == 2 and opts["ray_actor_options"] == {
        "num_cpus": 0.5, "runtime_env": {"env_vars": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}}}
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
    # what builder args refuse, Serve gets here; the ingress goes to Ray's environment
    assert set(opts) | {"ingress"} == set(NOT_OVERRIDABLE)
    assert (HTTPOptions(**opts).host, HTTPOptions(**opts).port) == ("10.0.0.5", 9001)


def test_ingress_modes_and_their_environment(monkeypatch, capsys):
    from serve_app import ingress

    env = ingress.ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert ingress.ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0",
                                            "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                                            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                                            **ingress.STARTUP_ENV}
    for mode in ingress.Ingress:
        for name, value in ingress.ingress_env(mode).items():
            monkeypatch.setenv(name, value)
        assert ingress.current() is mode  # what a Ray started in this environment runs
    one, two = ingress.isolated_env("haproxy"), ingress.isolated_env("haproxy")
    ports = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
             "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    assert all(one[k] != two[k] for k in ports)  # two instances share no file or port
    assert ingress.main(["--config", str(ROOT / "configs" / "demo.yaml")]) == 0
    assert "export RAY_SERVE_ENABLE_HA_PROXY=1" in capsys.readouterr().out.splitlines()


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
    assert "run_dir" not in version and str(demo_trained) not in json.dumps(version)
    assert version["rollout"] == {"status": "ok", "refused_at": None}
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


def test_haproxy_listens_on_loopback_only_and_keeps_its_admin_socket_private(server):
    """Serve's template binds stats and metrics on every interface; the wrapper moves them."""
    import os
    import stat

    import psutil

    folder = os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]  # this session's own
    procs = [p for p in psutil.process_iter(["name", "cmdline"])
             if p.info["name"] == "haproxy"
             and any(a.startswith(folder) for a in p.info["cmdline"] or [])]
    assert procs, "no HAProxy of this session runs"
    cmd = procs[0].info["cmdline"]
    config = cmd[cmd.index("-f") + 1]
    listening = [c.laddr for p in procs for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    ports = {int(os.environ[f"RAY_SERVE_HAPROXY_{k}_PORT"]) for k in ("STATS", "METRICS")}
    assert ports <= {a.port for a in listening}, listening  # both still answer, on loopback
    assert all(a.ip in ("127.0.0.1", "::1") for a in listening), listening
    text = Path(config).read_text()
    assert "mode 666" not in text and "bind *:" not in text
    admin = next(line.split()[2] for line in text.splitlines()
                 if line.strip().startswith("stats socket") and "level admin" in line)
    assert stat.S_IMODE(os.stat(admin).st_mode) == 0o600


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
    ("/recommend", {"user_id": 1, "k": "10"}, 422, "k", None),  # strict: no string numbers
    ("/recommend", {"user_id": [1]}, 422, "user_id", None),
    ("/recommend", {"user_id": None}, 422, "user_id", None),
    ("/recommend", {"user_id": 1180591620717411303424}, 422, "user_id", None),  # > int64
    ("/recommend", {"user_id": 2**53}, 422, "user_id", None),  # beyond JSON-safe integers
    ("/recommend", {"history": [1, 1180591620717411303424]}, 422, "history", None),
    ("/recommend", {"user_id": 1, "exclude_seen": "maybe"}, 422, "exclude_seen", None),
    ("/recommend", {"user_id": 1, "exclude_seen": 0}, 422, "exclude_seen", 0),
    ("/recommend", {"k": 5}, 422, "user_id", None),
    ("/recommend", {"user_id": 1, "colour": "red"}, 422, "colour", None),
    ("/recommend", {"user_id": 1, "k": 0}, 422, "k", 0),
    ("/recommend", {"user_id": 1, "k": 1001}, 422, "serve.max_k", 1001),
    ("/recommend", {"user_id": 1, "history": [1] * 1001}, 422, "serve.max_history", None),
    ("/recommend", {"user_id": 1, "exclude_items": [1] * 1001}, 422, "serve.max_exclude_items",
     None),
    ("/recommend", {"user_id": "x" * 1025}, 422, "serve.max_string_length", None),
    ("/recommend", {"user_id": 1, "features": {"age": "old"}}, 422, "age", "old"),
    ("/recommend", {"user_id": 1, "features": {"shoe_size": 44}}, 422, "shoe_size", None),
    ("/recommend", {"user_id": 1, "filter": {"colour": ["red"]}}, 422, "colour", None),
    ("/recommend", {"user_id": 1, "filter": {"category": "jazz"}}, 422, "category", None),
    ("/similar-items", {"k": 3}, 422, "item_id", None),
    ("/similar-items", {"item_id": 987654}, 404, "item_id", 987654),
    ("/score", {"user_id": 1, "item_ids": [1, 987654]}, 404, "item_ids", 987654),
    ("/score", {"user_id": 1, "item_ids": []}, 422, "item_ids", None),
]


@pytest.mark.parametrize("path,body,status,field,value", BAD_REQUESTS)
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, field, value):
    assert_names(server.post(path, json=body), status, field, value)
    assert server.post("/recommend", json={"user_id": 1, "k": 2}).status_code == 200


def test_a_huge_exclude_list_is_refused_naming_the_bound_and_serving_goes_on(server):
    # 10^5 exclude_items (about 0.6 MB of JSON: under the body cap, over the list bound)
    r = server.post("/recommend", json={"user_id": 1, "exclude_items": list(range(10**5))})
    assert_names(r, 422, "exclude_items")
    assert "serve.max_exclude_items" in r.text and "100000" in r.text
    assert r.json()["detail"][0]["input"] == "<list of 100000>"  # not echoed back whole
    # a body above serve.max_body_bytes (1 MiB) is refused before it is parsed
    big = {"user_id": 1, "exclude_items": list(range(10**6, 10**6 + 2 * 10**5))}
    r = server.post("/recommend", json=big)
    assert r.status_code == 413 and "serve.max_body_bytes" in r.text, r.text
    chunked = server.post("/recommend", content=iter([b"[" + b"1," * 600_000 + b"1]"]),
                          headers={"content-type": "application/json"})
    assert chunked.status_code == 413 and "serve.max_body_bytes" in chunked.text
    assert server.post("/recommend", json={"user_id": 1, "k": 3}).status_code == 200


def test_the_direct_path_and_fastapis_answer_alike(server):
    """A JSON body with a length takes ServingAPI's direct path; a chunked one, FastAPI's."""
    body = {"user_id": 1, "k": 7, "exclude_items": [3, 5]}
    direct = server.post("/recommend", json=body)
    raw = json.dumps(body).encode()
    chunked = server.post("/recommend", content=iter([raw[:5], raw[5:]]),
                          headers={"content-type": "application/json; charset=utf-8"})
    assert direct.status_code == chunked.status_code == 200, (direct.text, chunked.text)
    assert direct.json() == chunked.json() and len(direct.json()["items"]) == 7
    assert direct.headers["content-type"] == chunked.headers["content-type"]
    # errors raised past validation are answered by the app's handlers on both paths
    for send in (lambda b: server.post("/score", json=b),
                 lambda b: server.post("/score", content=iter([json.dumps(b).encode()]),
                                       headers={"content-type": "application/json"})):
        assert_names(send({"user_id": 1, "item_ids": [1, 987654]}), 404, "item_ids", 987654)
        assert_names(send({"user_id": 1, "features": {"age": "old"}, "item_ids": [1]}), 422,
                     "age", "old")
    # not JSON: FastAPI's own answer
    r = server.post("/recommend", content=b"user_id=1", headers={"content-type": "text/plain"})
    assert r.status_code == 422, r.text


def test_openapi_is_the_enforced_contract(server, retriever):
    doc = server.get("/openapi.json").json()
    paths, schemas = doc["paths"], doc["components"]["schemas"]
    for path in ("/similar-items", "/score"):
        assert "404" in paths[path]["post"]["responses"], path
    for path in ("/recommend", "/similar-items", "/score"):
        assert {"413", "422"} <= set(paths[path]["post"]["responses"]), path
    rec = schemas["RecommendRequest"]
    assert rec["anyOf"] == [{"required": ["user_id"]}, {"required": ["features"]},
                            {"required": ["history"]}]
    props = rec["properties"]
    assert props["exclude_seen"]["type"] == "boolean"
    assert props["k"]["maximum"] == 1000 and props["exclude_items"]["maxItems"] == 1000
    assert props["user_id"]["anyOf"][0]["maximum"] == 2**53 - 1  # JSON-safe integers
    # the run's own parts: its user columns and its filterable item features, nothing else
    assert set(props["features"]["properties"]) == set(retriever.encoder.sources)
    assert props["features"]["additionalProperties"] is False
    assert set(props["filter"]["properties"]) == {"category", "tags"}
    assert props["filter"]["additionalProperties"] is False


# -- attribute filters against a numpy oracle over the raw catalogue -----------------------

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


FILTERS = [  # (filter, allow_items as catalogue rows or None)
    ({"category": ["jazz", "cooking"]}, None),
    ({"tags": ["bestseller"]}, None),
    ({"category": ["jazz", "kids", "crime"], "tags": ["bebop", "castle", "recipe"]}, None),
    ({"category": ["jazz", "cooking", "kids"]}, list(range(0, 120, 3))),
    ({}, [5, 17, 40, 41, 99]),
    ({"category": ["no-such-category"]}, None),
]


@pytest.mark.parametrize("flt,allow", FILTERS)
def test_filters_return_exactly_the_filtered_top_k(server, demo_trained, users,
                                                   batch_embeddings, raw_items, flt, allow):
    item_ids, items = batch_embeddings["item_ids"], batch_embeddings["items"]
    for i, uid in enumerate(sample_test_users(demo_trained, 4, seed=5)):
        body = {"user_id": uid, "k": 10, "exclude_seen": i % 2 == 0, "filter": flt}
        if allow is not None:
            body["allow_items"] = [item_ids[r] for r in allow] + ["not-an-item"]
        r = server.post("/recommend", json=body)
        assert r.status_code == 200, r.text
        got = r.json()["items"]
        seen = users[uid]["seen_item_index"] if body["exclude_seen"] else []
        rows, scores, matching = filtered_oracle(batch_embeddings["users"][uid], items,
                                                 raw_items, flt, allow, seen, 10)
        assert ids_of(r.json()) == [item_ids[x] for x in rows], (uid, flt)
        np.testing.assert_allclose([e["score"] for e in got], scores, atol=1e-5)
        row_of = {item: row for row, item in enumerate(item_ids)}
        for entry in got:  # every returned item has the attributes asked for
            row = row_of[entry["item_id"]]
            assert all(raw_items["category"][row] in v if a == "category"
                       else raw_items["tags"][row] & set(v) for a, v in flt.items())
        assert len(got) == min(10, matching)  # never fewer than k when k match
    if flt == {"category": ["no-such-category"]}:
        assert got == []  # an empty match is an empty answer, not an error


def test_similar_items_take_filters_too(server, batch_embeddings, raw_items):
    item_ids, items = batch_embeddings["item_ids"], batch_embeddings["items"]
    flt = {"category": ["jazz", "crime"]}
    got = server.post("/similar-items", json={"item_id": item_ids[7], "k": 5,
                                              "filter": flt}).json()
    rows, scores, _ = filtered_oracle(items[7], items, raw_items, flt, None, [7], 5)
    assert ids_of(got) == [item_ids[r] for r in rows]
    np.testing.assert_allclose([e["score"] for e in got["items"]], scores, atol=1e-5)


# -- rollout: corrupt runs are refused, the old run serves, versions never mix -------------

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


CORRUPTIONS = {"truncated index": _truncate_index, "missing meta key": _drop_meta_key,
               "missing user store": _drop_user_store,
               "stale user store": _stale_user_store,
               "reordered catalogue": _reorder_catalogue,
               "mismatched feature state": _change_feature_state}


@pytest.fixture(scope="module")
def corrupt_runs(second_model, tmp_path_factory):
    """Each corruption applied to its own copy of the second (good) run."""
    root = tmp_path_factory.mktemp("corrupt")
    runs = {}
    for i, (name, corrupt) in enumerate(CORRUPTIONS.items()):
        runs[name] = copy_run(second_model, root / f"run{i}")
        corrupt(runs[name])
    return runs


@pytest.mark.parametrize("kind", [*CORRUPTIONS, "foreign index manifest"])
def test_each_corrupt_run_is_refused_by_the_loader_naming_the_file(kind, corrupt_runs,
                                                                    tampered_run):
    from serve_app.retriever import Retriever

    run = tampered_run if kind == "foreign index manifest" else corrupt_runs[kind]
    names = {"truncated index": "index.faiss", "missing meta key": "meta.json",
             "missing user store": "data.mdb", "stale user store": "an-older-model",
             "reordered catalogue": "items.parquet",
             "mismatched feature state": "feature state",
             "foreign index manifest": "model_version='not-this-model'"}
    with pytest.raises((ValueError, FileNotFoundError)) as err:  # typed at the edge
        Retriever(run)
    assert names[kind] in str(err.value), str(err.value)


def test_reconfigure_is_a_coroutine_so_batching_changes_on_the_event_loop():
    """Serve runs a plain `def reconfigure` in a thread pool; ours must stay on the loop."""
    import inspect

    from serve_app.app import RetrievalDeployment

    cls = RetrievalDeployment.func_or_class
    assert inspect.iscoroutinefunction(cls.reconfigure)
    source = inspect.getsource(cls.reconfigure)
    # the load goes to a worker thread; the batching settings and the swap come after it,
    # in one synchronous step on the loop
    assert "run_in_executor" in inspect.getsource(cls._load)
    assert source.index("await self._load(") < source.index("self._swap(")
    swap = inspect.getsource(cls._swap)
    assert not inspect.iscoroutinefunction(cls._swap)
    assert swap.index("_set_batching(") < swap.index("self._retriever = ")


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


def test_rollout_under_load_to_corrupt_runs_then_a_new_version(server, demo_trained,
                                                               second_model, corrupt_runs):
    """`serve deploy` of 5 corrupt runs, then of a good run of ANOTHER model version,
    while 4 client loops send requests: every answer is a 200 from one whole version,
    the old one until the swap and the new one after, never a mix, never a 5xx."""
    import httpx
    from ray import serve

    bodies = [{"user_id": u, "k": 5} for u in sample_test_users(demo_trained, 40, seed=9)]
    old, old_answers = answers_of(demo_trained, bodies)
    new, new_answers = answers_of(second_model, bodies)
    assert old != new and old_answers != new_answers  # the two versions can be told apart
    expected = {old: old_answers, new: new_answers}
    port = server.base_url.port
    client = serve.context._get_global_client()  # what `serve deploy` sends
    client.deploy_apps(deploy_config(demo_trained, port), _blocking=True)
    log: list[list[tuple[int, int, str | None, bool]]] = [[] for _ in range(4)]
    done = threading.Event()

    def traffic(lane: int) -> None:  # bounded: stops when told, or after 3,000 requests
        with httpx.Client(base_url=server.base_url, timeout=HTTP_TIMEOUT) as own:
            for n in range(3000):
                if done.is_set():
                    return
                i = (lane * 7 + n) % len(bodies)
                r = own.post("/rollout/recommend", json=bodies[i])
                version = r.json().get("model_version") if r.status_code == 200 else None
                same = version in expected and ids_of(r.json()) == expected[version][i]
                log[lane].append((i, r.status_code, version, same))

    lanes = [threading.Thread(target=traffic, args=(n,)) for n in range(4)]
    for lane in lanes:
        lane.start()
    refusals = []
    try:
        for name, run in corrupt_runs.items():
            seen_before = server.get("/rollout/version").json()["rollout"]["refused_at"]
            client.deploy_apps(deploy_config(demo_trained, port, {"run_dir": str(run)}))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                version = server.get("/rollout/version").json()
                status = version["rollout"]
                if status["status"] == "refused" and status["refused_at"] != seen_before:
                    refusals.append(name)
                    break
                time.sleep(0.05)
            # the old run still serves; /version shows no path and no exception text
            assert version["model_version"] == old, name
            assert str(run) not in json.dumps(version) and "Error" not in json.dumps(version)
        client.deploy_apps(deploy_config(demo_trained, port, {"run_dir": str(second_model)}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            version = server.get("/rollout/version").json()
            if version["model_version"] == new:
                break
            time.sleep(0.05)
        assert version["rollout"] == {"status": "ok", "refused_at": None}  # cleared
        swapped_at = [len(lane_log) for lane_log in log]
        while min(len(lg) - s for lg, s in zip(log, swapped_at, strict=True)) < 20:
            time.sleep(0.05)  # 20 more answers per lane after the swap was seen
            assert all(lane.is_alive() for lane in lanes), "a client loop ended early"
    finally:
        done.set()
        for lane in lanes:
            lane.join(timeout=60)
        serve.delete(ROLLOUT_APP)
    entries = [e for lane_log in log for e in lane_log]
    counts = {"requests": len(entries), "old": sum(e[2] == old for e in entries),
              "new": sum(e[2] == new for e in entries),
              "non_200": sum(e[1] != 200 for e in entries),
              "mixed_or_wrong": sum(not e[3] for e in entries)}
    print(f"rollout under load: {counts}, refused: {refusals}")
    assert refusals == list(CORRUPTIONS), refusals
    assert counts["non_200"] == 0 and counts["mixed_or_wrong"] == 0, counts
    for lane_log in log:  # per client: old ... old new ... new, never back
        versions = [e[2] for e in lane_log]
        flip = versions.index(new)
        assert set(versions[:flip]) == {old} and set(versions[flip:]) == {new}
        assert flip > 0
    assert counts["old"] > 0 and counts["new"] >= 4 * 20


def test_check_tool_accepts_a_good_run_and_names_every_bad_one(demo_trained, tampered_run,
                                                                corrupt_runs, capsys):
    from serve_app.check import main

    assert main([str(demo_trained)]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(demo_trained.resolve())
    assert main([str(tampered_run)]) == 1
    assert "model_version='not-this-model'" in capsys.readouterr().err
    for name, run in corrupt_runs.items():
        assert main([str(run)]) == 1, name
        err = capsys.readouterr().err
        assert "cannot be served" in err and "Traceback" not in err, (name, err)


# -- fuzzing the live endpoint against its own OpenAPI document ---------------------------

@pytest.mark.slow
def test_schemathesis_finds_no_5xx_and_no_contract_violation(server, tmp_path):
    """>= 1,000 generated requests through HAProxy, every schemathesis check passing.

    ``python -m benchmarks.api_fuzz --url`` against this module's endpoint, as a user fuzzes
    a running one (the tests never import benchmarks), with 500 hostile requests beside.
    """
    output = tmp_path / "fuzz.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.api_fuzz", "--url", str(server.base_url),
         "--cases", "1000", "--hostile-cases", "500", "--output", str(output),
         "--record-dir", str(tmp_path)],  # a test run is no committed record
        cwd=ROOT, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads(output.read_text())
    assert report["test_cases"]["generated"] >= 1000, proc.stdout
    assert report["operations"]["tested"] == 6, proc.stdout
    assert report["failures"] == [], report["console_tail"]  # not_a_server_error included
    assert report["test_cases"]["errored"] == 0, report["console_tail"]
    hostile = report["hostile"]
    assert hostile["cases"] == 500 and hostile["server_errors"] == 0 == hostile["bad_count"]
    assert server.post("/recommend", json={"user_id": 1}).status_code == 200  # still up


# -- last: a replica kill (the module's other tests need the first replica) ------------

def test_an_event_over_http_survives_a_replica_kill(server, batch_embeddings):
    """POST /events, kill the replica, and the one Serve starts again has the event."""
    import ray

    item = batch_embeddings["item_ids"][7]
    uid = 10**9 + 7  # a new user: created by its first event (known users stay as prepared)
    ok = server.post("/events", json={"user_id": uid, "item_id": item})
    assert ok.status_code == 200 and ok.json()["in_history"] == 1, ok.text
    first = server.post("/recommend", json={"user_id": uid, "k": 50}).json()
    assert first["state_version"] == 1 and item not in ids_of(first)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and f"{APP}#Retrieval" in a["name"]]
    assert len(replicas) == 1, replicas
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=False)
    deadline = time.monotonic() + 120
    answer = None
    while time.monotonic() < deadline:
        try:
            got = server.post("/recommend", json={"user_id": uid, "k": 50})
            if got.status_code == 200:
                answer = got.json()
                break
        except Exception:  # noqa: BLE001 - the replica is coming back
            pass
        time.sleep(0.5)
    assert answer is not None, "the replica did not come back within 120 s"
    assert answer["state_version"] == 1 and item not in ids_of(answer)
    assert ids_of(answer) == ids_of(first)
    steady = 0  # HAProxy closes the connections of the killed replica: settle before leaving
    while steady < 10 and time.monotonic() < deadline + 60:
        try:
            steady = steady + 1 if server.get("/healthz").status_code == 200 else 0
        except Exception:  # noqa: BLE001 - a pooled connection the restart closed
            steady = 0
        time.sleep(0.2)
