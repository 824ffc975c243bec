"""Starting or joining Ray the same way from every job.

Environment defaults are set before ``ray.init`` so that workers inherit them (see
RAY_NOTES): a stalled Ray Data pipeline fails instead of hanging, and two Serve
instances on one host never silently share a port.
"""

from __future__ import annotations

import os

_ENV_DEFAULTS = {
    "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": "120",
    "SERVE_SOCKET_REUSE_PORT_ENABLED": "0",
}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local one.

    A local start turns token authentication off unless ``RAY_AUTH_MODE`` says otherwise,
    and binds the dashboard to 127.0.0.1 only.
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
