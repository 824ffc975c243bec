"""A Ray head started with ``scripts/demo.sh``'s own ``ray start --head`` line, for tests.

Every port is a free one and the head has its own temp dir (short: Ray's socket paths), so
it never meets another Ray on the machine; it is stopped by the PIDs it started, never with
``ray stop``. ``tests/test_ray_head.py`` checks what it listens on, and
``tests/test_serve_busy.py`` deploys the endpoint onto it while both cores are busy.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from serve_app.environment import free_port
from tests.conftest import ROOT

DEMO = ROOT / "scripts" / "demo.sh"
PORT_FLAGS = ("port", "ray-client-server-port", "dashboard-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "node-manager-port", "object-manager-port",
              "runtime-env-agent-port")


def demo_head_command(num_cpus: int = 1) -> list[str]:
    """The demo's ``ray start --head`` line, as words (``$(nproc)`` made ``num_cpus``)."""
    line = next(li.strip() for li in DEMO.read_text().splitlines()
                if li.strip().startswith("ray start --head"))
    return shlex.split(line.replace('"$(nproc)"', str(num_cpus)))


def demo_auth_mode() -> str:
    """The auth mode demo.sh exports when the user sets none."""
    return re.search(r'export RAY_AUTH_MODE="\$\{RAY_AUTH_MODE:-(\w+)\}"',
                     DEMO.read_text()).group(1)


def head_processes(temp_dir: str) -> list[psutil.Process]:
    """The processes of the head started with ``temp_dir``, and their children."""
    roots = [p for p in psutil.process_iter(["cmdline"])
             if any(temp_dir in arg for arg in (p.info["cmdline"] or []))]
    found = {p.pid: p for p in roots}
    for p in roots:
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``processes``."""
    out = []
    for p in processes:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port)
                    for c in p.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    return out


@dataclass(frozen=True)
class Head:
    temp_dir: str
    ports: dict[str, int]
    env: dict[str, str]  # what a client of this head needs (auth mode and token path)

    @property
    def token(self) -> str:
        return (Path(self.temp_dir) / "token").read_text()

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"


@contextmanager
def demo_head(num_cpus: int = 1, extra_env: Mapping[str, str] | None = None,
              start_timeout_s: float = 180) -> Iterator[Head]:
    """Start the demo's head with its auth mode (and ``extra_env``); yield it; kill it."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    (Path(temp_dir) / "token").write_text("t" * 32)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    workers = free_port()
    command = [*demo_head_command(num_cpus), f"--temp-dir={temp_dir}",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 10}",
               *(f"--{flag}={port}" for flag, port in ports.items())]
    client_env = {"RAY_AUTH_MODE": demo_auth_mode(),
                  "RAY_AUTH_TOKEN_PATH": str(Path(temp_dir) / "token")}
    env = dict(os.environ, **client_env, **(extra_env or {}))
    env.pop("RAY_AUTH_TOKEN", None)
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True,
                                 timeout=start_timeout_s, cwd=ROOT)
        assert started.returncode == 0, started.stderr[-2000:]
        deadline = time.monotonic() + 60  # the agents come up after `ray start` returns
        while time.monotonic() < deadline:
            names = {name for name, _, _ in listening(head_processes(temp_dir))}
            if {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names):
                break
            time.sleep(1)
        yield Head(temp_dir, ports, client_env)
    finally:
        for p in head_processes(temp_dir):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
