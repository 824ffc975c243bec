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
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests import ray_heads

LOOPBACK = ("127.0.0.1", "::1")


def host_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (what ``::`` / 0.0.0.0 reach)."""
    return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")]


@pytest.fixture
def demo_head():
    with ray_heads.demo_head() as head:
        yield head.temp_dir, head.ports


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
    assert ray_heads.demo_auth_mode() == "token"
    assert "--node-ip-address=127.0.0.1" in ray_heads.demo_head_command()
    temp_dir, ports = demo_head
    sockets = ray_heads.listening(ray_heads.head_processes(temp_dir))
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
