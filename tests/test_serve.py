"""Serving: request encoding without skew, exact answers, errors, version guard, rollout.

In-process logic is in ``tests/test_serve_inprocess.py``; the HTTP tests here share one deployment
(``run_app``: Serve started on a free 127.0.0.1 port of the session's Ray, behind the
HAProxy ingress as shipped), and the rollout tests deploy ``configs/serve.yaml`` as a
second application. The oracles are numpy over the batch job's files
(``embeddings/*/model_version=V``) and the catalogue's raw attributes, not the serving code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.serve_cases import (  # noqa: F401  (fixtures, registered by import)
    APP,
    CORRUPTIONS,
    HTTP_TIMEOUT,
    ROLLOUT_APP,
    answers_of,
    assert_names,
    batch_embeddings,
    corrupt_runs,
    deploy_config,
    exact_top_k,
    filtered_oracle,
    ids_of,
    raw_items,
    retriever,
    sample_test_users,
    second_model,
    served_run,
    server,
    users,
)


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
