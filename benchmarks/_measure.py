"""Run one benchmark side in a subprocess and watch its whole process tree's memory.

The peak is the largest sum of RSS over the subprocess and all its descendants (Ray's
GCS, raylet, object store and workers included), sampled every 0.1 s with psutil. Pages
shared between processes (the object store, torch's libraries) count once per process
that maps them, so the figure is an upper bound on what the machine had to hold.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_EVERY_S = 0.1


@dataclass(frozen=True)
class Watched:
    """What one watched subprocess left behind."""

    returncode: int
    stdout: str
    peak_rss_mib: float
    wall_s: float


def side_env() -> dict[str, str]:
    """The environment a side runs with: this project importable, Ray token auth off."""
    return dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))


def run_watched(cmd: list[str], env: dict[str, str] | None = None) -> Watched:
    """Run ``cmd`` from the project root until it exits; stderr passes through.

    stdout goes to a temporary file rather than a pipe, so a chatty side can never block
    on a full pipe while it is being watched.
    """
    import psutil

    with tempfile.TemporaryFile(mode="w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or side_env(), stdout=out, text=True)
        parent, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(parent))
            time.sleep(SAMPLE_EVERY_S)
        wall = time.perf_counter() - start
        out.seek(0)
        stdout = out.read()
    return Watched(proc.returncode, stdout, round(peak / 2**20, 1), round(wall, 3))


def tree_rss(parent) -> int:
    """Bytes of RSS summed over ``parent`` and its descendants (0 once it has exited)."""
    import psutil

    try:
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    return sum(_rss(p) for p in tree)


def _rss(p) -> int:
    try:
        return p.memory_info().rss
    except Exception:  # a worker that exited between listing and reading
        return 0


def add_side_flags(p, sides) -> None:
    """The hidden flags a benchmark passes to its own per-side subprocess."""
    import argparse

    p.add_argument("--side", choices=list(sides), help=argparse.SUPPRESS)
    for flag in ("--config", "--prepared", "--run-dir", "--result"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help=argparse.SUPPRESS)
