"""The committed record of one benchmark run: figures, command, commit, machine and date.

Every benchmark ends with :func:`write_record`, which writes ``results/NAME.json`` (one file
per benchmark and setting, the latest run only: git history keeps the others). The docs'
results page and its plots are rendered from these files, never typed by hand.

A record is::

    {"benchmark": "quality", "setting": "amazon-sports", "command": "python -m ...",
     "commit": "1a2b3c4 (dirty)", "date": "2026-12-07T09:30:00+00:00",
     "machine": {"cores": 2, "memory_gib": 23.4, "cpu_model": "...", "platform": "..."},
     "figures": {...}}
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def record_name(benchmark: str, setting: str | None = None) -> str:
    """File stem of a record: ``benchmark`` or ``benchmark-setting``."""
    return benchmark if not setting else f"{benchmark}-{setting}"


def machine() -> dict:
    """Cores, memory and CPU model of this machine (Linux /proc where present)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = None
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return {"cores": os.cpu_count(), "memory_gib": memory, "cpu_model": cpu,
            "platform": platform.platform(), "python": platform.python_version()}


def commit() -> str:
    """The checked-out commit, marked ``(dirty)`` when tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()

    head = git("rev-parse", "--short=10", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{head} (dirty)" if dirty else head


def command(module: str, argv: list[str] | None = None) -> str:
    """The command line that ran: ``python -m MODULE ARGS``."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", module, *args])


def write_record(benchmark: str, figures: dict, *, module: str, argv: list[str] | None = None,
                 setting: str | None = None, out_dir: Path | None = None) -> Path:
    """Write ``results/NAME.json`` for one run and return its path.

    Args:
        benchmark: the benchmark's name (``quality``, ``scale``, ...).
        figures: what it measured (JSON-serialisable).
        module: the benchmark's module, for the command line (``benchmarks.quality``).
        argv: its arguments (default ``sys.argv[1:]``).
        setting: the data set or setting the record is for, if the benchmark has several.
        out_dir: where to write (default ``results/``; tests pass a temporary folder).
    """
    out = (out_dir or RESULTS) / f"{record_name(benchmark, setting)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"benchmark": benchmark, "setting": setting, "command": command(module, argv),
            "commit": commit(), "date": dt.datetime.now(dt.timezone.utc).isoformat(
                timespec="seconds"), "machine": machine(), "figures": figures}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=1) + "\n")
    tmp.replace(out)
    return out


def read_record(path: Path) -> dict:
    """One record, checked for the keys every record carries."""
    body = json.loads(Path(path).read_text())
    missing = {"benchmark", "command", "commit", "date", "machine", "figures"} - body.keys()
    if missing:
        raise ValueError(f"{path}: not a benchmark record, missing {sorted(missing)}")
    return body
