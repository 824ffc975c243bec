"""The user-state store: users read per request, events appended, both backends real.

The embedded store is the LMDB environment ``jobs.build_index`` wrote into the demo run; the
Redis tests start a real ``redis-server`` on 127.0.0.1 at a free port (stopped by PID at
the end). Each test that writes works on its own copy of the run. The oracles are the
prepared tables (``users.parquet``) and the exported tower's own answers, not the store.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from tests.conftest import demo_config

CI = bool(os.environ.get("CI"))


# -- fixtures -----------------------------------------------------------------------------

@pytest.fixture
def run_copy(demo_trained, tmp_path) -> Path:
    """A private copy of the trained demo run (events write into its store)."""
    dst = tmp_path / "run"
    shutil.copytree(demo_trained, dst)
    return dst


def serve_cfg(tmp: Path, **kw):
    from pipeline.config.serve import ServeConfig

    return ServeConfig(events_dir=str(tmp / "events"), **kw)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A real redis-server on a free loopback port, for this module; stopped by PID."""
    exe = shutil.which("redis-server")
    if exe is None:
        if CI:
            pytest.fail("redis-server is not installed (scripts/setup_env.sh installs it)")
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not answer within 5 s")
    yield url
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


def known_user_and_new_item(run: Path):
    """A user of the test split and a catalogue item it has never seen (by the tables)."""
    users = pq.read_table(run / "prepared" / "users.parquet").to_pylist()
    items = pq.read_table(run / "prepared" / "items.parquet", columns=["item_id"])
    ids = items["item_id"].to_pylist()
    test = set(pads.dataset(str(run / "prepared" / "test")).to_table(["user_id"])["user_id"]
               .to_pylist())
    user = next(u for u in users if u["user_id"] in test)
    seen = set(user["seen_item_index"])
    row = next(r for r in range(len(ids)) if r not in seen)
    return user, ids[row], row


# -- the record format and keys -----------------------------------------------------------

def test_keys_follow_the_lookup_rule():
    from serve_app.user_store import user_key

    assert user_key(7, pa.int64()) == user_key("7", pa.int64()) == b"7"
    for bad in (" 7", "+7", "x", 7.5, True, None, 2**63):
        assert user_key(bad, pa.int64()) is None, bad
    assert user_key("u1", pa.string()) == b"u1" and user_key(7, pa.string()) == b"7"


def test_records_round_trip_without_pickle(run_copy):
    from pipeline.run_dir import RunDir
    from serve_app.store_backends import LmdbBackend
    from serve_app.user_store import Layout, UserStore

    run = RunDir(run_copy)
    layout = Layout.read(run.user_state)
    users = pq.read_table(run.table("user")).to_pylist()
    assert layout.users == len(users)
    store = UserStore(layout, LmdbBackend(run.user_state))
    states = store.read([u["user_id"] for u in users[:20]] + ["nobody", -1])
    for u, st in zip(users[:20], states[:20], strict=True):
        for c in layout.columns:
            np.testing.assert_array_equal(st.columns[c.name][0], np.asarray(u[c.name]), c.name)
        assert st.seen.tolist() == sorted(set(u["seen_item_index"]))
        assert st.version == 0 and st.embedding.shape == (layout.embedding_dim,)
    assert states[20:] == [None, None]
    store.close()


# -- events change what /recommend answers --------------------------------------------------

def post_and_check(r, user, item, row):
    """Post one event; the next /recommend excludes it and runs the tower on new history."""
    from serve_app.schemas import RecommendRequest

    req = RecommendRequest(user_id=user["user_id"], k=len(r.item_ids) - 1)
    before = r.recommend([req])[0]
    emb_before = r.user_embeddings([RecommendRequest(user_id=user["user_id"])])[0]
    assert before.state_version == 0
    assert item in [i.item_id for i in before.items]  # not seen: may be returned
    events = events_body([{"user_id": user["user_id"], "item_id": item,
                                     "timestamp": 2_000_000_000}])
    answer = r.post_events(events)
    assert (answer.accepted, answer.in_history, answer.unknown_items) == (1, 1, [])
    after = r.recommend([req])[0]
    assert after.state_version == 1
    assert item not in [i.item_id for i in after.items]
    encoded = r.encode_user(RecommendRequest(user_id=user["user_id"]))
    assert encoded.embedding is None and row in encoded.seen.tolist()
    assert encoded.columns["user__history"][0][-1] >= 2  # the new item, last
    emb_after = r.user_embeddings([RecommendRequest(user_id=user["user_id"])])[0]
    assert np.abs(emb_after - emb_before).max() > 1e-4
    return emb_after


def events_body(items):
    """Events validated as the route validates its body."""
    from pydantic import TypeAdapter

    from serve_app.schemas import DEFAULT_MODELS

    return TypeAdapter(DEFAULT_MODELS.events).validate_python(items)


def test_an_event_changes_the_next_answer_and_survives_a_restart(run_copy, tmp_path):
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    cfg = serve_cfg(tmp_path)
    r = Retriever(run_copy, cfg)
    user, item, row = known_user_and_new_item(run_copy)
    emb = post_and_check(r, user, item, row)
    r.store.close()
    again = Retriever(run_copy, cfg)  # a restarted replica: the event is on disk
    assert again.recommend([RecommendRequest(user_id=user["user_id"])])[0].state_version == 1
    np.testing.assert_allclose(
        again.user_embeddings([RecommendRequest(user_id=user["user_id"])])[0], emb, atol=1e-6)
    # the log holds it, in the run's interaction columns
    files = sorted((tmp_path / "events").glob("events-*.parquet"))
    assert len(files) == 1
    logged = pq.read_table(files[0]).to_pylist()
    assert logged == [{"user_id": user["user_id"], "item_id": item,
                       "timestamp": 2_000_000_000, "weight": 1.0}]


def test_fresh_history_equals_sending_it(run_copy, tmp_path):
    """The stored history plus an event encodes as prepare would encode the longer history."""
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    r = Retriever(run_copy, serve_cfg(tmp_path))
    user, item, _ = known_user_and_new_item(run_copy)
    r.post_events(events_body([{"user_id": user["user_id"], "item_id": item}]))
    fresh = r.encode_user(RecommendRequest(user_id=user["user_id"])).columns
    stored = np.asarray(user["user__history"])
    real = stored[stored != 0]
    want = np.concatenate([real, fresh["user__history"][0][-1:]])[-len(stored):]
    got = fresh["user__history"][0]
    np.testing.assert_array_equal(got[len(got) - len(want):], want)
    assert (got[:len(got) - len(want)] == 0).all()


def test_unknown_items_are_logged_not_stored_and_new_users_are_created(run_copy, tmp_path):
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    r = Retriever(run_copy, serve_cfg(tmp_path))
    known = r.item_ids[3]
    answer = r.post_events(events_body([
        {"user_id": 10**9, "item_id": 10**12},  # an item no catalogue row holds
        {"user_id": 10**9, "item_id": known, "weight": 2.0},
    ]))
    assert (answer.accepted, answer.in_history, answer.unknown_items) == (2, 1, [0])
    new = r.encode_user(RecommendRequest(user_id=10**9))
    assert new.state_version == 1 and new.seen.tolist() == [3]
    assert (new.columns["user__history"][0] != 0).sum() == 1
    logged = pq.read_table(next((tmp_path / "events").glob("events-*.parquet")))
    assert logged["item_id"].to_pylist() == [10**12, known]
    assert logged["weight"].to_pylist() == [1.0, 2.0]
    # "7" is the integer key 7 (the lookup rule): one list may mix both spellings
    mixed = r.post_events(events_body([{"user_id": 10**9 + 1, "item_id": known},
                                       {"user_id": str(10**9 + 1), "item_id": known}]))
    assert mixed.in_history == 2
    assert r.encode_user(RecommendRequest(user_id=10**9 + 1)).state_version == 2


def test_wrongly_typed_ids_are_refused_naming_the_field(run_copy, tmp_path):
    from serve_app.request_errors import RequestError
    from serve_app.retriever import Retriever

    r = Retriever(run_copy, serve_cfg(tmp_path))
    for body, loc in ((["x", 1], (0, "user_id")), ([1, "x"], (0, "item_id"))):
        with pytest.raises(RequestError) as err:
            r.post_events(events_body([{"user_id": body[0], "item_id": body[1]}]))
        assert err.value.loc == loc
    assert not list((tmp_path / "events").glob("*.parquet"))  # nothing logged


def test_memory_store_serves_as_before_and_refuses_events(run_copy, tmp_path, demo_trained):
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest
    from serve_app.user_store import StoreReadOnly

    user, item, _ = known_user_and_new_item(run_copy)
    mem = Retriever(run_copy, serve_cfg(tmp_path, user_store="memory"))
    emb = Retriever(run_copy, serve_cfg(tmp_path))
    req = [RecommendRequest(user_id=user["user_id"], k=20)]
    assert mem.recommend(req)[0] == emb.recommend(req)[0]
    with pytest.raises(StoreReadOnly):
        mem.post_events(events_body([{"user_id": user["user_id"],
                                                "item_id": item}]))


def test_replay_applies_logged_events_once(run_copy, tmp_path):
    """Events posted to the old run reach a new store by replay, each file once."""
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    cfg = serve_cfg(tmp_path)
    old = Retriever(run_copy, cfg)
    user, item, _ = known_user_and_new_item(run_copy)
    fresh_copy = tmp_path / "run2"
    shutil.copytree(run_copy, fresh_copy)  # "the new run": its store has no event yet
    old.post_events(events_body([{"user_id": user["user_id"], "item_id": item}]))
    new = Retriever(fresh_copy, cfg)
    assert new.encode_user(RecommendRequest(user_id=user["user_id"])).state_version == 0
    assert new.replay() == 1 and new.replay() == 0
    assert new.encode_user(RecommendRequest(user_id=user["user_id"])).state_version == 1
    assert old.replay() == 0  # its own event is already there


# -- Redis -------------------------------------------------------------------------------

def test_redis_store_takes_events_and_reports_outages(run_copy, tmp_path, redis_url):
    from jobs import user_store as job
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest
    from serve_app.user_store import StoreUnavailable

    cfg = serve_cfg(tmp_path, user_store="redis", redis_url=redis_url)
    with pytest.raises(FileNotFoundError, match="jobs.user_store"):
        Retriever(run_copy, cfg)  # not loaded yet: says how
    job.main([str(run_copy), "--redis-url", redis_url])
    r = Retriever(run_copy, cfg)
    user, item, row = known_user_and_new_item(run_copy)
    embedded = Retriever(run_copy, serve_cfg(tmp_path))
    req = [RecommendRequest(user_id=user["user_id"], k=10)]
    assert r.recommend(req)[0] == embedded.recommend(req)[0]  # the same records
    post_and_check(r, user, item, row)
    again = Retriever(run_copy, cfg)  # another replica (or a restart) sees the event
    assert again.encode_user(RecommendRequest(user_id=user["user_id"])).state_version == 1
    # the server goes away: a known user is a StoreUnavailable (503); one with history is
    # still served
    down = Retriever.__new__(Retriever)
    down.__dict__.update(again.__dict__)
    from serve_app.store_backends import RedisBackend

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    down.store.backend = RedisBackend(f"redis://127.0.0.1:{dead}/0", "x:", 0.2)
    with pytest.raises(StoreUnavailable):
        down.recommend(req)
    with pytest.raises(StoreUnavailable):
        down.post_events(events_body([{"user_id": user["user_id"],
                                                 "item_id": item}]))
    served = down.recommend([RecommendRequest(user_id=user["user_id"], history=[item])])[0]
    assert len(served.items) == 10 and item not in [i.item_id for i in served.items]
    assert len(list((tmp_path / "events").glob("*.parquet"))) == 1  # the refused one removed


# -- the events log is the next run's data ------------------------------------------------

def test_prepare_reads_the_events_log(run_copy, tmp_path, demo_data, ray_session):
    from prepare.run import run_prepare
    from serve_app.retriever import Retriever

    r = Retriever(run_copy, serve_cfg(tmp_path))
    user, item, _ = known_user_and_new_item(run_copy)
    t = 4_000_000_000  # after every demo interaction: the user's newest
    r.post_events(events_body([
        {"user_id": user["user_id"], "item_id": item, "timestamp": t + i} for i in range(3)]))
    out = tmp_path / "next"
    run_prepare(demo_config(demo_data, f"data.extra_interactions={tmp_path / 'events'}"),
                out, log=lambda m: None)
    train = pads.dataset(str(out / "prepared" / "train")).to_table().to_pylist()
    ts = [row for row in train if row["user_id"] == user["user_id"]
          and row.get("timestamp", 0) >= t]
    test = pads.dataset(str(out / "prepared" / "test")).to_table().to_pylist()
    mine = [row for row in test if row["user_id"] == user["user_id"]]
    # three new interactions: the last is the test target, one validation, one training
    assert len(ts) == 1 and len(mine) == 1
    from pipeline.run_dir import RunDir, read_prepare_manifest

    inputs = read_prepare_manifest(RunDir(out)).inputs["interactions"]
    assert any(Path(p).name.startswith("events-") for p in inputs)


# -- over HTTP: the route's 4xx and 503 answers -------------------------------------------

class RetrieverService:
    """The routes' callee over one in-process Retriever (what the deployment does)."""

    def __init__(self, retriever):
        self.r = retriever

    async def recommend(self, body):  # noqa: D102
        return self.r.recommend_encoded([self.r.encode_recommend(body)])[0].to_json()

    async def similar_items(self, body):  # noqa: D102
        return self.r.similar_encoded([self.r.encode_similar(body)])[0].to_json()

    async def score(self, body):  # noqa: D102
        return self.r.score_encoded([self.r.encode_score(body)])[0].to_json()

    async def events(self, body):  # noqa: D102
        return self.r.post_events(body)

    async def health(self):  # noqa: D102
        return {"status": "ok", "model_version": self.r.model_version}

    async def version(self):  # noqa: D102
        return self.r.info()

    def run_schemas(self):  # noqa: D102
        return self.r.model_version, self.r.contract.openapi()


def test_events_route_refuses_bad_input_and_keeps_answering(run_copy, tmp_path):
    from fastapi.testclient import TestClient

    from serve_app.api import build_api
    from serve_app.retriever import Retriever
    from serve_app.store_backends import RedisBackend

    cfg = serve_cfg(tmp_path, max_events=3)
    r = Retriever(run_copy, cfg)
    client = TestClient(build_api(RetrieverService(r), cfg), raise_server_exceptions=False)
    user, item, _ = known_user_and_new_item(run_copy)
    uid = user["user_id"]

    def post(text):
        return client.post("/events", content=text.encode(),
                           headers={"content-type": "application/json"})

    bad = [
        (f'{{"user_id": {uid}, "item_id": {item}, "color": "red"}}', ["body", 0, "color"]),
        (f'{{"user_id": {2**64}, "item_id": {item}}}', ["body", 0, "user_id"]),
        (f'{{"user_id": {uid}, "item_id": {item}, "weight": NaN}}', ["body", 0, "weight"]),
        (f'{{"user_id": {uid}, "item_id": {item}, "weight": -1.0}}', ["body", 0, "weight"]),
        (f'{{"user_id": {uid}, "item_id": {item}, "timestamp": -5}}',
         ["body", 0, "timestamp"]),
        (f'{{"user_id": {uid}, "item_id": {item}, "timestamp": {2**60}}}',
         ["body", 0, "timestamp"]),
        (f'[{{"user_id": {uid}, "item_id": "x"}}]', ["body", 0, "item_id"]),
        ('[]', ["body"]),
    ]
    for text, loc in bad:
        got = post(text)
        assert got.status_code == 422, (text, got.text)
        assert any(d["loc"][:len(loc)] == loc for d in got.json()["detail"]), (text, got.text)
    many = post("[" + ",".join([f'{{"user_id": {uid}, "item_id": {item}}}'] * 4) + "]")
    assert many.status_code == 422 and "serve.max_events" in many.text, many.text
    assert not list((tmp_path / "events").glob("*.parquet"))  # nothing refused was logged
    ok = post(f'[{{"user_id": {uid}, "item_id": {item}}}]')
    assert ok.status_code == 200 and ok.json()["in_history"] == 1, ok.text
    rec = client.post("/recommend", json={"user_id": uid, "k": 5})
    assert rec.status_code == 200 and rec.json()["state_version"] == 1
    # a store that is down: 503 with Retry-After, and the server keeps answering
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r.store.backend = RedisBackend(f"redis://127.0.0.1:{dead}/0", "x:", 0.2)
    for path, body in (("/events", {"user_id": uid, "item_id": item}),
                       ("/recommend", {"user_id": uid})):
        down = client.post(path, json=body)
        assert down.status_code == 503 and down.headers["retry-after"] == "1", down.text
        assert "does not answer" in down.json()["detail"][0]["msg"]
    with_history = client.post("/recommend", json={"user_id": uid, "history": [item], "k": 5})
    assert with_history.status_code == 200, with_history.text
    assert client.get("/healthz").status_code == 200
