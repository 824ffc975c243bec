"""The HAProxy endpoint comes up, from ``serve run`` and from the demo's path, with both cores busy.

With Serve's defaults the controller gave the HTTP front three ready checks of 5 s; on a
machine at load 4-6 HAProxy's manager actor started more slowly, was killed, and
``serve run`` exited with ``ActorDiedError: HAProxyManager`` (4 starts of 5). Here two
processes spin on the two cores while ``serve run RUN_DIR/serve.yaml`` starts its own
local Ray with the environment ``python -m jobs.environment`` gives (plus per-test files
and ports); ``/healthz`` must answer. The demo's path is ``scripts/demo.sh``'s own: its
``ray start --head`` line, started with that environment while the cores spin, then
``serve deploy`` through the head's dashboard with the token. Everything started is stopped
by PID.
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

from serve_app import environment
from serve_app.deploy_config import deploy_config
from tests import ray_heads
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


def wait_healthy(port: int, alive, log: Path) -> None:
    """Poll ``/healthz`` for ``START_S`` seconds, while ``alive()``; assert a 200."""
    deadline, status = time.monotonic() + START_S, None
    while time.monotonic() < deadline and alive():
        try:
            status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code
        except httpx.HTTPError:
            status = None
        if status == 200:
            return
        time.sleep(2)
    raise AssertionError(f"/healthz answered {status}: {log.read_text()[-3000:]}")


def spin_both_cores() -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(2)]


def serve_yaml(run_dir: Path, folder: Path) -> tuple[int, Path]:
    """The run's ``serve deploy`` config on a free port, written under ``folder``."""
    port = environment.free_port()
    config = deploy_config(run_dir)
    config["http_options"]["port"] = port
    config_file = folder / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return port, config_file


def test_serve_run_comes_up_with_both_cores_busy(demo_trained, tmp_path):
    port, config_file = serve_yaml(demo_trained, tmp_path)
    env = dict(os.environ, **environment.isolated_env(environment.Ingress.HAPROXY),
               RAY_AUTH_MODE="disabled", RAY_ADDRESS="local", PYTHONPATH=str(ROOT),
               SERVE_SOCKET_REUSE_PORT_ENABLED="0")
    log = tmp_path / "serve-run.log"
    spinners = spin_both_cores()
    with log.open("w") as out:
        server = subprocess.Popen([str(Path(sys.executable).parent / "serve"), "run",
                                   str(config_file)], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, lambda: server.poll() is None, log)
    finally:
        for spinner in spinners:
            spinner.kill()
        stop_tree(server)


def test_the_demos_head_and_serve_deploy_come_up_with_both_cores_busy(demo_trained, tmp_path):
    port, config_file = serve_yaml(demo_trained, tmp_path)
    head_env = dict(environment.isolated_env(environment.Ingress.HAPROXY), PYTHONPATH=str(ROOT),
                    SERVE_SOCKET_REUSE_PORT_ENABLED="0")
    log = tmp_path / "serve-deploy.log"
    spinners = spin_both_cores()
    try:
        with ray_heads.demo_head(num_cpus=os.cpu_count() or 2, extra_env=head_env) as head:
            env = dict(os.environ, **head.env)
            env.pop("RAY_AUTH_TOKEN", None)
            with log.open("w") as out:
                deployed = subprocess.run(
                    [str(Path(sys.executable).parent / "serve"), "deploy", "--address",
                     head.dashboard, str(config_file)], cwd=ROOT, env=env, stdout=out,
                    stderr=subprocess.STDOUT, timeout=START_S)
            assert deployed.returncode == 0, log.read_text()[-3000:]
            wait_healthy(port, lambda: True, log)
    finally:
        for spinner in spinners:
            spinner.kill()
