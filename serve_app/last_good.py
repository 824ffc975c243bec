"""The last run a replica loaded, recorded beside the runs: where a restarted replica falls back.

A replica that cannot load its configured run (a refused rollout, then a crash or a
scale-up) loads the run recorded here instead of failing; the record is written after each
run loads.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from pipeline.run_dir import write_json

logger = logging.getLogger("ray.serve")
LAST_GOOD = ".towerline-last-good.json"  # beside the run directories


def last_good_path(run_dir: str | Path) -> Path:
    """The record of the last run that loaded, in the folder that holds ``run_dir``."""
    return Path(run_dir).resolve().parent / LAST_GOOD


def write_last_good(run_dir: str | Path) -> None:
    """Record ``run_dir`` as the last run that loaded (a read-only folder: logged, skipped)."""
    try:
        write_json(last_good_path(run_dir), {
            "run_dir": str(Path(run_dir).resolve()),
            "loaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    except OSError as err:
        logger.warning("cannot record %s as the last run that loaded: %s", run_dir, err)


def read_last_good(run_dir: str | Path) -> str | None:
    """The last run that loaded beside ``run_dir``, if any and if it is another run."""
    try:
        record = json.loads(last_good_path(run_dir).read_text(encoding="utf-8"))
        good = str(record["run_dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return good if Path(good) != Path(run_dir).resolve() else None
