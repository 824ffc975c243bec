"""The committed record of one benchmark run: figures, command, commit, machine and date.

Every benchmark ends with :func:`write_record`, which writes ``results/NAME.json`` (one file
per benchmark and setting, the latest run only: git history keeps the others). The docs'
results page and its plots are rendered from these files, never typed by hand
(``python -m jobs.docs``, which reads them through :mod:`reports.records`).

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

from reports.records import RESULTS, ROOT, read_record, record_name

__all__ = ["RESULTS", "ROOT", "add_record_flag", "command", "commit", "machine",
           "read_record", "record_dir", "record_name", "save_record", "setting_of",
           "write_record"]


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
            "platform": platform.platform(), "python": platform.python_version(),
            # other work on a shared machine moves every timing: the load when it was written
            "load_average": [round(x, 2) for x in os.getloadavg()]}


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


def add_record_flag(parser) -> None:
    """``--record-dir``: where the run's record goes (a ``--tiny`` run writes none by default)."""
    parser.add_argument(
        "--record-dir", help="Folder for the committed record results/NAME.json (default: "
        "results/; a --tiny run writes no record unless this is given), e.g. --record-dir "
        "/tmp/records.")
    parser.add_argument(
        "--setting", help="Name of this run's setting in the record's file name, for a run "
        "smaller or otherwise unlike the default, e.g. --setting 1-start.")


def setting_of(args, default: str | None = None) -> str | None:
    """The record's setting: ``--setting`` joined to the benchmark's own (data set, size)."""
    given = getattr(args, "setting", None)
    return "-".join(s for s in (default, given) if s) or None


def record_dir(args) -> Path | None:
    """The folder a benchmark's record goes to, from its parsed flags; None: no record."""
    if getattr(args, "record_dir", None):
        return Path(args.record_dir)
    return None if getattr(args, "tiny", False) else RESULTS


def save_record(args, benchmark: str, figures: dict, *, module: str,
                setting: str | None = None) -> Path | None:
    """Write a run's record where its flags say (:func:`record_dir`); returns the path or None.

    Args:
        args: the benchmark's parsed flags (``--record-dir``, ``--setting``, ``--tiny``).
        benchmark: the benchmark's name.
        figures: what it measured.
        module: the benchmark's module, for the command line.
        setting: the benchmark's own setting (data set, size), joined with ``--setting``.
    """
    out = record_dir(args)
    if out is None:
        return None
    path = write_record(benchmark, figures, module=module, setting=setting_of(args, setting),
                        out_dir=out)
    print(f"record {path}")
    return path
