"""End to end, for real: `ray start --head` -> `ray job submit` of the pipeline ->
`serve deploy` -> an HTTP query -> the dashboard's job API -> everything stopped.

The head runs in its own temporary directory on free ports bound to 127.0.0.1, as a
`ray start --block` subprocess that is terminated at the end (never `ray stop`, which
would kill every Ray on the machine). Each wait is a bounded loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, SEQUENCE_OVERRIDES

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for(check, timeout: float, what: str, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def answers(url: str) -> bool:
    """True when ``url`` answers 200 (False while the server is not up yet)."""
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def cli(env, *args, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 in a temporary directory; terminated afterwards."""
    gcs, dash, serve_port, *agent = free_ports(6)
    from serve_app import environment

    env = dict(os.environ, RAY_AUTH_MODE="disabled", PATH=f"{BIN}:{os.environ['PATH']}",
               SERVE_SOCKET_REUSE_PORT_ENABLED="0", RAY_ADDRESS="",
               RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="120")
    # the shipped ingress (HAProxy), chosen at `ray start` as scripts/demo.sh does, with
    # this head's own HAProxy files and ports
    haproxy = Path("/tmp") / f"tl-hap-{os.getpid()}"  # short: HAProxy's socket paths too
    env.update(environment.isolated_env(environment.Ingress.HAPROXY, str(haproxy)))
    env.pop("RAY_ADDRESS")
    temp = Path("/tmp") / f"tl-e2e-{os.getpid()}"  # short: Ray's socket paths have a limit
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--temp-dir={temp}",
         f"--port={gcs}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent[0]}",
         f"--metrics-export-port={agent[1]}", f"--runtime-env-agent-port={agent[2]}",
         "--num-cpus=2", "--disable-usage-stats"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for(lambda: answers(f"{url}/api/gcs_healthz"), 90, "the dashboard")
        yield {"env": env, "dashboard": url, "serve_port": serve_port, "haproxy": haproxy}
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", url], env=env,
                       capture_output=True, timeout=60)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(haproxy, ignore_errors=True)


@pytest.mark.slow
def test_job_submit_pipeline_then_serve_deploy_and_query(ray_head, demo_data, tmp_path):
    env, url = ray_head["env"], ray_head["dashboard"]
    run_dir = tmp_path / "run"
    # the sequence mode (configs/demo.yaml's), small; two DDP workers
    sets = [a for o in [f"data.root={demo_data}", *SEQUENCE_OVERRIDES,
                        "train.num_workers=2"] for a in ("--set", o)]
    submitted = cli(env, "ray", "job", "submit", "--address", url, "--working-dir", ".",
                    "--no-wait", "--", "python", "-m", "jobs.pipeline", "--config",
                    "configs/tiny.yaml", "--output-dir", str(run_dir), *sets)
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", submitted.stdout + submitted.stderr)[0]

    def finished():
        info = httpx.get(f"{url}/api/jobs/{job_id}", timeout=10).json()
        return info if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED") else None

    info = wait_for(finished, 600, "the pipeline job", every=3)
    logs = httpx.get(f"{url}/api/jobs/{job_id}/logs", timeout=10).json()["logs"]
    assert info["status"] == "SUCCEEDED", logs[-4000:]
    assert f"Serve it:  serve run {run_dir.resolve()}/serve.yaml   (answers at " \
        "http://127.0.0.1:8000)" in logs and "| test | exact |" in logs
    written = yaml.safe_load((run_dir / "serve.yaml").read_text())  # loopback, this run
    assert written["http_options"]["host"] == "127.0.0.1"
    assert written["applications"][0]["args"]["run_dir"] == str(run_dir.resolve())
    # the job's log on a cluster is as clean as a local run's (tests/test_logs.py)
    assert "PlacementGroupCleaner" not in logs and "TrainingReport(" not in logs
    assert len(re.findall(r"\[train\] epoch \d+/2 ", logs)) == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 < metrics["test"]["exact"]["HR@100"] <= 1
    prepared = json.loads((run_dir / "prepared" / "manifest.json").read_text())
    assert prepared["rows"]["sequences"] > 0  # trained on windows, not interaction rows
    assert metrics["index_recall"]["recall@20"] == pytest.approx(1.0)  # Flat index

    serve_cfg = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    serve_cfg["http_options"]["port"] = ray_head["serve_port"]
    serve_cfg["applications"][0]["args"]["run_dir"] = str(run_dir)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(serve_cfg))
    cli(env, "serve", "deploy", "--address", url, str(tmp_path / "serve.yaml"))
    base = f"http://127.0.0.1:{ray_head['serve_port']}"
    try:
        wait_for(lambda: answers(f"{base}/healthz"), 180, "the Serve endpoint", every=2)
    except AssertionError:
        status = subprocess.run([str(BIN / "serve"), "status", "--address", url], env=env,
                                capture_output=True, text=True, timeout=60)
        raise AssertionError(f"Serve did not answer; serve status:\n{status.stdout}") from None
    users = json.loads((run_dir / "index" / "manifest.json").read_text())
    answer = httpx.post(f"{base}/recommend", json={"user_id": 1, "k": 5}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert len(body["items"]) == 5 and body["model_version"] == users["model_version"]
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # a history sent with the request runs the exported transformer tower
    seen = httpx.post(f"{base}/recommend", json={"history": [3, 5, 7], "k": 5}, timeout=30)
    assert seen.status_code == 200 and len(seen.json()["items"]) == 5, seen.text
    # the documented URL is HAProxy's: docs and the version guard's report answer there
    assert httpx.get(f"{base}/docs", timeout=10).status_code == 200
    version = httpx.get(f"{base}/version", timeout=10).json()
    assert version["model_version"] == users["model_version"]
    assert version["rollout"]["status"] == "ok"
    haproxy = [p for p in ray_head["haproxy"].rglob("*.cfg")]
    assert haproxy and f":{ray_head['serve_port']}" in haproxy[0].read_text()
    jobs = httpx.get(f"{url}/api/jobs/", timeout=10).json()
    assert [j["status"] for j in jobs if j["submission_id"] == job_id] == ["SUCCEEDED"]
