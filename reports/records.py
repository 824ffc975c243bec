"""The committed benchmark record: its keys, its file name, reading one, listing them.

A record is ``results/NAME.json`` (``NAME`` = ``benchmark`` or ``benchmark-setting``)::

    {"benchmark": "quality", "setting": "amazon-sports", "command": "python -m ...",
     "commit": "1a2b3c4 (dirty)", "date": "2026-12-07T09:30:00+00:00",
     "machine": {"cores": 2, "memory_gib": 23.4, "cpu_model": "...", "platform": "..."},
     "figures": {...}}

``benchmarks.record.write_record`` writes it; the docs read it through this module.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
RECORD_KEYS = frozenset({"benchmark", "command", "commit", "date", "machine", "figures"})


def record_name(benchmark: str, setting: str | None = None) -> str:
    """File stem of a record: ``benchmark`` or ``benchmark-setting``."""
    return benchmark if not setting else f"{benchmark}-{setting}"


def read_record(path: Path) -> dict:
    """One record, checked for the keys every record carries."""
    body = json.loads(Path(path).read_text())
    missing = RECORD_KEYS - body.keys()
    if missing:
        raise ValueError(f"{path}: not a benchmark record, missing {sorted(missing)}; "
                         "accepted: a file written by benchmarks.record.write_record")
    return body


def read_records(folder: Path = RESULTS) -> dict[str, dict]:
    """Every record in ``folder`` by file stem, in name order (empty when there is none)."""
    return {p.stem: read_record(p) for p in sorted(Path(folder).glob("*.json"))}
