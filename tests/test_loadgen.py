"""benchmarks.loadgen's asyncio client (the fallback when wrk is not installed), on a tiny
HTTP server in this process: it counts every answer, its statuses and its latencies."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import ROOT


class Echo(BaseHTTPRequestHandler):
    """POST /ok answers 200 with the body's "n"; any other path a 404."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

    def do_POST(self):  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        out = json.dumps({"n": body["n"]}).encode()
        self.send_response(200 if self.path == "/ok" else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def echo_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


@pytest.mark.parametrize("path,ok", [("/ok", True), ("/missing", False)])
def test_asyncio_client_counts_answers_and_statuses(echo_server, tmp_path, path, ok):
    bodies = tmp_path / "bodies.jsonl"
    bodies.write_text("\n".join(json.dumps({"n": i}) for i in range(5)) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen", echo_server + path, str(bodies),
         "--concurrency", "4", "--seconds", "1"], cwd=ROOT, capture_output=True, text=True,
        timeout=60, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["tool"] == "asyncio" and figures["requests"] > 20
    assert figures["non_2xx"] == (0 if ok else figures["requests"])
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert figures["rps"] == pytest.approx(figures["requests"] / 1.0, rel=0.5)
