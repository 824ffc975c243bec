"""Starting or joining Ray the same way from every job, once per process.

Environment defaults (:mod:`serve_app.environment`, their one home) are set before
``ray.init`` so that workers inherit them (see RAY_NOTES). A job that runs several steps
(``jobs.pipeline``, ``jobs.tune``) calls :func:`ensure_ray` before each and gets the same
Ray instance every time.

Ray's own console output is set through Ray's settings, so that a job log reads as one
line per Ray Data stage and one per training epoch:

- Ray Data: no "Starting execution"/"Execution plan" lines
  (``DataContext.print_on_execution_start``), no 10-second progress blocks on a
  non-terminal stdout and no "Data sink ... finished" line after a write (the
  ``ray.data._internal.progress`` and ``ray.data.dataset`` loggers at WARNING); each
  stage's "execution finished in N seconds" line stays, warnings stay, and Ray Data's
  full log is kept in the session's ``logs/ray-data``.
- Ray Train's PlacementGroupCleaner asks the State API every second whether the
  training controller is alive, and without a reachable dashboard it logs a warning
  each time (hundreds per run) or dies with a traceback. A local start therefore runs
  the dashboard on 127.0.0.1 and tells every worker where it is
  (``RAY_API_SERVER_ADDRESS``); a job on a cluster passes its ``RAY_ADDRESS`` on.
- On a local start Ray Train's preemption watcher (spot-node preemption, meaningless on
  one machine) is off unless ``RAY_TRAIN_ENABLE_PREEMPTION_WATCHER`` says otherwise.
"""

from __future__ import annotations

import logging
import os

from serve_app.environment import LOCAL_DEFAULTS, RAY_DEFAULTS, free_port
from towers.exported import WEIGHTS_ONLY_ENV


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster in ``RAY_ADDRESS`` (as under ``ray job submit``) or start a local one.

    A local start turns token authentication off unless ``RAY_AUTH_MODE`` says otherwise,
    and binds the dashboard to 127.0.0.1 only (Ray prints its URL).
    """
    import ray

    if ray.is_initialized():
        return
    for key, value in RAY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(log_to_driver=True, runtime_env={"env_vars": {"RAY_ADDRESS": address,
                                                               **WEIGHTS_ONLY_ENV}})
    else:
        for key, value in LOCAL_DEFAULTS.items():
            os.environ.setdefault(key, value)
        port = free_port()
        api = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True,
                 dashboard_host="127.0.0.1", dashboard_port=port,
                 runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": api,
                                           **WEIGHTS_ONLY_ENV}})
    quiet_ray_data()


def quiet_ray_data() -> None:
    """One console line per Ray Data stage in this process (see the module docstring)."""
    import ray.data

    ray.data.DataContext.get_current().print_on_execution_start = False
    for name in ("ray.data._internal.progress", "ray.data.dataset"):
        logging.getLogger(name).setLevel(logging.WARNING)

