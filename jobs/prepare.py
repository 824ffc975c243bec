r"""Prepare: three Parquet tables -> split, fitted feature state, encoded Parquet.

Inputs: the ``data`` and ``features`` sections of the config.
Outputs: ``RUN_DIR/prepared/`` (see :mod:`prepare.run` for the layout).
Errors: one ``error: ...`` line naming the file (and row), the column and what is
accepted; exit code 2 for the config and flags, 1 for the data; RUN_DIR is left as it was.

    python -m jobs.prepare --config configs/demo.yaml --output-dir runs/demo
    ray job submit --working-dir . -- python -m jobs.prepare \
        --config configs/demo.yaml --output-dir /shared/runs/demo
"""

from __future__ import annotations

import sys

from jobs.cli import parse_job_args, user_errors
from jobs.ray_setup import ensure_ray
from pipeline.config import Config
from pipeline.run_dir import PrepareManifest
from prepare.run import in_process, run_prepare, validate_inputs


def run(cfg: Config, run_dir) -> PrepareManifest:
    """Check the inputs (before Ray starts: a bad file fails fast), then prepare.

    Small inputs (``prepare.local_max_rows``) are prepared in this process, larger ones
    through Ray Data.
    """
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    files = validate_inputs(cfg)
    rows, limit = sum(files["interactions"].rows), cfg.prepare.local_max_rows
    local = in_process(cfg, files)
    log(f"[prepare] {rows:,} interactions "
        + (f"<= prepare.local_max_rows={limit:,}: in this process" if local else
           f"> prepare.local_max_rows={limit:,}: through Ray Data"))
    if not local:
        ensure_ray()
    return run_prepare(cfg, run_dir, files=files, log=log, ray_data=not local)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run."""
    cfg, run_dir = parse_job_args(__doc__, argv)
    with user_errors():
        run(cfg, run_dir)


if __name__ == "__main__":
    main()
