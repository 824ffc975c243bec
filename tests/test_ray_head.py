"""The demo's Ray head runs nobody's code: what listens off loopback demands the token.

Starts a head with the ``ray start --head`` line of ``scripts/demo.sh`` and the auth mode
it exports, on free ports and its own temp dir (so it never meets another Ray on the
machine), and looks at every socket its processes listen on (psutil). Ray 2.60's GCS,
raylet and dashboard agent bind the machine's network address whatever
``--node-ip-address`` says (measured: ``::``, ``0.0.0.0`` and the host address), so the
test sends the dashboard agent's job API (``POST /api/job_agent/jobs/``, which runs a shell
command) a job without the token on loopback (the one address test traffic may go to; the
same HTTP app and token check serve the agent's other addresses): it must be refused and
run nothing. The
dashboard itself must listen on 127.0.0.1 only. The head is stopped by the PIDs it
started, never with ``ray stop``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT

DEMO = ROOT / "scripts" / "demo.sh"
LOOPBACK = ("127.0.0.1", "::1")
PORT_FLAGS = ("port", "ray-client-server-port", "dashboard-port",
              "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
              "metrics-export-port", "node-manager-port", "object-manager-port",
              "runtime-env-agent-port")


def demo_head_command() -> list[str]:
    """The demo's ``ray start --head`` line, as words (``$(nproc)`` made 1)."""
    line = next(li.strip() for li in DEMO.read_text().splitlines()
                if li.strip().startswith("ray start --head"))
    return shlex.split(line.replace('"$(nproc)"', "1"))


def demo_auth_mode() -> str:
    """The auth mode demo.sh exports when the user sets none."""
    return re.search(r'export RAY_AUTH_MODE="\$\{RAY_AUTH_MODE:-(\w+)\}"',
                     DEMO.read_text()).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def host_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (what ``::`` / 0.0.0.0 reach)."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


@pytest.fixture
def demo_head():
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths
    (Path(temp_dir) / "token").write_text("t" * 32)
    ports = {flag: free_port() for flag in PORT_FLAGS}
    workers = free_port()
    command = [*demo_head_command(), f"--temp-dir={temp_dir}",
               f"--min-worker-port={workers}", f"--max-worker-port={workers + 10}",
               *(f"--{flag}={port}" for flag, port in ports.items())]
    env = dict(os.environ, RAY_AUTH_MODE=demo_auth_mode(),
               RAY_AUTH_TOKEN_PATH=str(Path(temp_dir) / "token"))
    env.pop("RAY_AUTH_TOKEN", None)
    started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stderr[-2000:]
        deadline = time.monotonic() + 60  # the agents come up after `ray start` returns
        while time.monotonic() < deadline:
            names = {name for name, _, _ in listening(head_processes(temp_dir))}
            if {"gcs_server", "raylet"} <= names and any("DashboardAgent" in n for n in names):
                break
            time.sleep(1)
        yield temp_dir, ports
    finally:
        for p in head_processes(temp_dir):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def submit(address: str, port: int, marker: Path, token: str | None = None) -> int:
    """POST a job to the agent's job API; the HTTP status (or 0: nothing answered)."""
    host = f"[{address}]" if ":" in address else address
    body = json.dumps({"entrypoint": f"touch {marker}"}).encode()
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(f"http://{host}:{port}/api/job_agent/jobs/", data=body,
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return 0


def test_the_demo_head_refuses_jobs_from_the_network_and_keeps_the_dashboard_local(
        demo_head, tmp_path):
    assert demo_auth_mode() == "token"
    assert "--node-ip-address=127.0.0.1" in demo_head_command()
    temp_dir, ports = demo_head
    sockets = listening(head_processes(temp_dir))
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    exposed = sorted({(n, a, p) for n, a, p in sockets if a not in LOOPBACK})
    # the dashboard (the job REST API of `ray job submit`) is on loopback only
    assert [s for s in sockets if s[2] == ports["dashboard-port"]] and \
        all(a in LOOPBACK for _, a, p in sockets if p == ports["dashboard-port"])
    # every address the agent's job API answers on, loopback and the network alike
    agent = ports["dashboard-agent-listen-port"]
    bound = {a for _, a, p in sockets if p == agent}
    targets = {"127.0.0.1", *host_addresses()} if bound & {"0.0.0.0", "::"} else bound
    assert targets - set(LOOPBACK), f"the agent is on loopback only: {exposed}"
    # Requests go to loopback only (this workplace sends test traffic nowhere else): the
    # agent's one HTTP app, token check included, serves every address it listens on.
    marker = tmp_path / "ran"
    statuses = {address: submit(address, agent, marker)
                for address in sorted(set(targets) & {"127.0.0.1", "::1"}) or ["127.0.0.1"]}
    time.sleep(2)  # a job that got in would have run by now
    assert not marker.exists(), statuses
    assert all(status == 401 for status in statuses.values()), (statuses, exposed)
    # the token is the gate: with it, the same request is accepted and its command runs
    token = (Path(temp_dir) / "token").read_text()
    assert submit("127.0.0.1", agent, marker, token) == 200
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(1)
    assert marker.exists()
