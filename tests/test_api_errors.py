"""Every 4xx body is strict JSON whatever the input, and error work is bounded.

In process, over ASGI: :func:`serve_app.api.build_api` around a stand-in service whose
routes check ``features`` and ``filter`` against a two-column run contract, as the
deployment does. Nothing here needs Ray, a model or a run directory.
"""

from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient

from pipeline.config.serve import ServeConfig
from pipeline.state import FeatureKind, FeatureState
from serve_app.api import build_api
from serve_app.contract import RunContract
from serve_app.request_errors import cap_errors, json_safe

CFG = ServeConfig()
CONTRACT = RunContract.build(
    {"age": [FeatureState(type=FeatureKind.NUMERIC, source="age")],
     "country": [FeatureState(type=FeatureKind.CATEGORICAL, source="country")]},
    {"genre": FeatureState(type=FeatureKind.CATEGORICAL, source="genre", vocab=["jazz"])},
    CFG)


class Service:
    """The routes' callee: checks the run's contract, then answers a constant."""

    async def recommend(self, body):  # noqa: D102
        if body.features is not None:
            CONTRACT.check_features(body.features)
        if body.filter is not None:
            CONTRACT.check_filter(body.filter)
        return b'{"items":[],"model_version":"v"}'

    async def similar_items(self, body):  # noqa: D102
        return b'{"items":[],"model_version":"v"}'

    async def score(self, body):  # noqa: D102
        return b'{"scores":[],"model_version":"v"}'

    async def health(self):  # noqa: D102
        return {"status": "ok", "model_version": "v"}

    async def version(self):  # noqa: D102
        return {}

    def run_schemas(self):  # noqa: D102
        return "v", CONTRACT.openapi()


@pytest.fixture(scope="module")
def client():
    return TestClient(build_api(Service(), CFG), raise_server_exceptions=False)


def post(client, path: str, text: str):
    """POST raw JSON text (Python's json accepts NaN / Infinity; httpx would refuse)."""
    return client.post(path, content=text.encode("utf-8", "surrogatepass"),
                       headers={"content-type": "application/json"})


def strict_json(raw: bytes):
    """Parse as strict JSON in UTF-8: no NaN / Infinity literals, no lone surrogates."""
    def refuse(literal):
        raise ValueError(f"non-standard literal {literal}")

    text = raw.decode("utf-8")  # raises on bytes a lone surrogate would need
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("path,text,field", [
    ("/recommend", '{"user_id": NaN}', "user_id"),
    ("/recommend", '{"user_id": 1, "k": Infinity}', "k"),
    ("/recommend", '{"user_id": 1, "k": -Infinity}', "k"),
    ("/recommend", '{"user_id": "\\ud800"}', "user_id"),
    ("/recommend", '{"history": ["a", "\\udfff"], "k": NaN}', "k"),
    ("/recommend", '{"features": {"age": NaN}}', "features"),
    ("/recommend", '{"features": {"\\ud800": 1}}', "features"),
    ("/recommend", '{"user_id": 1, "filter": {"genre": [Infinity]}}', "filter"),
    ("/recommend", '{"user_id": 1, "filter": {"\\udc80x": ["jazz"]}}', "filter"),
    ("/similar-items", '{"item_id": NaN}', "item_id"),
    ("/score", '{"user_id": 1, "item_ids": [NaN, Infinity, "\\ud83d"]}', "item_ids"),
])
def test_non_json_literals_and_lone_surrogates_get_a_422_in_strict_json(
        client, path, text, field):
    answer = post(client, path, text)
    assert answer.status_code == 422, answer.content[:300]
    detail = strict_json(answer.content)["detail"]
    assert detail and all(set(e) == {"type", "loc", "msg", "input"} for e in detail)
    assert field in {str(part) for e in detail for part in e["loc"]}


def test_json_safe_keeps_the_value_readable():
    assert json_safe({"a": float("nan"), "b": [float("inf"), -float("inf")], "\ud800": "x\udfff"}) \
        == {"a": "NaN", "b": ["Infinity", "-Infinity"], "\ufffd": "x\ufffd"}
    assert json_safe([1, 2.5, True, None, "é"]) == [1, 2.5, True, None, "é"]


def test_many_feature_keys_are_one_bounded_error(client):
    # one key above serve.max_keys: refused by count, before any key is checked; one entry
    keys = {f"column_{i}": 1 for i in range(CFG.max_keys + 1)}
    answer = post(client, "/recommend", json.dumps({"features": keys}))
    assert answer.status_code == 422
    detail = strict_json(answer.content)["detail"]
    assert len(detail) == 1 and detail[0]["loc"] == ["body", "features"]
    assert f"at most {CFG.max_keys} (serve.max_keys)" in detail[0]["msg"]
    assert detail[0]["input"] == f"<object of {CFG.max_keys + 1} keys>"


def test_many_filter_keys_are_bounded(client):
    keys = {f"attr_{i}": ["jazz"] for i in range(CFG.max_keys + 1)}
    answer = post(client, "/recommend", json.dumps({"user_id": 1, "filter": keys}))
    assert answer.status_code == 422
    assert strict_json(answer.content)["detail"][0]["loc"] == ["body", "filter"]


def test_unknown_keys_within_the_bound_give_at_most_max_errors_entries(client):
    # 64 unknown keys, each an extra_forbidden entry: 19 listed and one that counts 45 more
    keys = {f"column_{i}": 1 for i in range(CFG.max_keys)}
    start = time.perf_counter()
    answer = post(client, "/recommend", json.dumps({"features": keys}))
    elapsed = time.perf_counter() - start
    assert answer.status_code == 422
    detail = strict_json(answer.content)["detail"]
    assert len(detail) == CFG.max_errors == 20
    assert detail[-1]["type"] == "too_many_errors"
    assert detail[-1]["msg"].startswith(f"{CFG.max_keys - 19} more errors")
    assert len(answer.content) < 10_000 and elapsed < 1.0


def test_the_old_request_of_many_keys_is_now_small_and_quick(client):
    # the audit's 0.77 MB request: 40,000 unknown keys gave a 12.3 MB answer in 0.66 s
    keys = {f"k{i:06d}": 0 for i in range(40_000)}
    text = json.dumps({"features": keys})
    start = time.perf_counter()
    answer = post(client, "/recommend", text)
    elapsed = time.perf_counter() - start
    assert answer.status_code == 422 and len(answer.content) < 1_000
    assert elapsed < 0.5, elapsed


def test_cap_errors_counts_what_it_leaves_out():
    errors = [{"type": "t", "loc": ["body", i], "msg": "m", "input": None} for i in range(5)]
    assert cap_errors(errors, 5) == errors
    capped = cap_errors(errors, 3)
    assert [e["loc"] for e in capped[:2]] == [["body", 0], ["body", 1]]
    assert capped[2]["type"] == "too_many_errors" and capped[2]["msg"].startswith("3 more")


# -- slow clients --------------------------------------------------------------------------

SLOTS = 32  # the replica's max_ongoing_requests in Serve (deployment_options: 2 x 16)


class Slots:
    """At most ``n`` requests inside the app at once, the rest wait: Serve's replica slots."""

    def __init__(self, app, n: int):
        self.app, self.n, self.sem = app, n, None

    async def __call__(self, scope, receive, send):
        import asyncio

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.sem = self.sem or asyncio.Semaphore(self.n)
        async with self.sem:
            await self.app(scope, receive, send)


@pytest.fixture
def slotted_server():
    """The API behind ``SLOTS`` slots on a uvicorn of 127.0.0.1 (body deadline 1 s)."""
    import socket
    import threading

    import uvicorn

    cfg = ServeConfig(body_timeout_s=1.0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(Slots(build_api(Service(), cfg), SLOTS),
                                           host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):
        if server.started:
            break
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def test_a_trickled_body_gets_a_408_at_the_deadline():
    import asyncio

    app = build_api(Service(), ServeConfig(body_timeout_s=0.5))
    sent: list[dict] = []

    async def trickle():  # one byte every 0.1 s, for ever
        await asyncio.sleep(0.1)
        return {"type": "http.request", "body": b"{", "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/recommend", "raw_path": b"/recommend",
             "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
             "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"900")]}
    start = time.perf_counter()
    asyncio.run(app(scope, trickle, send))
    assert 0.5 <= time.perf_counter() - start < 1.5
    assert sent[0]["status"] == 408
    detail = strict_json(b"".join(m.get("body", b"") for m in sent[1:]))["detail"]
    assert detail[0]["type"] == "body_timeout" and "serve.body_timeout_s" in detail[0]["msg"]


def test_twice_the_slot_count_of_slow_clients_do_not_stop_normal_requests(slotted_server):
    # 64 clients send headers, then one body byte each 0.3 s for 5 s: without a deadline
    # they would hold all 32 slots for those 5 s (for as long as they kept sending)
    import socket
    import threading

    import httpx

    port, stop = slotted_server, threading.Event()

    def slow_client():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(b"POST /recommend HTTP/1.1\r\nhost: x\r\ncontent-type: "
                         b"application/json\r\ncontent-length: 1000\r\n\r\n")
            while not stop.wait(0.3):
                try:
                    conn.sendall(b" ")
                except OSError:  # answered (408) and closed: the slot is free
                    return

    clients = [threading.Thread(target=slow_client, daemon=True) for _ in range(2 * SLOTS)]
    for c in clients:
        c.start()
    time.sleep(0.5)  # every slot is taken by now
    try:
        start, answers = time.perf_counter(), []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            for _ in range(5):
                answers.append(http.post("/recommend", json={"user_id": 1}).status_code)
        elapsed = time.perf_counter() - start
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=5)
    assert answers == [200] * 5
    # each slow client is cut at 1 s (serve.body_timeout_s): the first normal request waits
    # at most for the deadline of the slots ahead of it, well before the 5 s of trickling
    assert elapsed < 4.0, elapsed
