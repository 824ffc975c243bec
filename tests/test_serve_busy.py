"""The HAProxy endpoint comes up from ``serve run`` while both cores are held busy.

With Serve's defaults the controller gave the HTTP front three ready checks of 5 s; on a
machine at load 4-6 HAProxy's manager actor started more slowly, was killed, and
``serve run`` exited with ``ActorDiedError: HAProxyManager`` (4 starts of 5). Here two
processes spin on the two cores while ``serve run RUN_DIR/serve.yaml`` starts its own
local Ray with the environment ``python -m serve_app.ingress`` gives (plus per-test files
and ports); ``/healthz`` must answer. Everything started is stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from serve_app import ingress
from serve_app.deploy_config import deploy_config
from tests.conftest import ROOT

SPIN = "import time\nend = time.time() + 600\nwhile time.time() < end:\n    pass\n"
START_S = 300


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop ``proc`` and every process under it (the local Ray it started), by PID."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    proc.send_signal(signal.SIGINT)  # serve run shuts Serve down on Ctrl-C
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_serve_run_comes_up_with_both_cores_busy(demo_trained, tmp_path):
    port = ingress.free_port()
    config = deploy_config(demo_trained)
    config["http_options"]["port"] = port
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = dict(os.environ, **ingress.isolated_env(ingress.Ingress.HAPROXY),
               RAY_AUTH_MODE="disabled", RAY_ADDRESS="local", PYTHONPATH=str(ROOT),
               SERVE_SOCKET_REUSE_PORT_ENABLED="0")
    log = tmp_path / "serve-run.log"
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(2)]
    with log.open("w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run",
                                   str(config_file)], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        deadline, status = time.monotonic() + START_S, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(2)
        assert status == 200, (server.poll(), log.read_text()[-3000:])
    finally:
        for spinner in spinners:
            spinner.kill()
        stop_tree(server)
