r"""Tune: the config's ``tune.space`` searched on Ray Tune -> ``RUN_DIR/best_config.yaml``.

Inputs: the whole config; ``RUN_DIR/prepared/`` (prepared first when missing). Outputs:
``RUN_DIR/tune/`` (Tune's results, one folder per trial, ``summary.json``), one MLflow
run per trial in ``RUN_DIR/mlruns`` (or ``train.mlflow.tracking_uri``), and
``RUN_DIR/best_config.yaml``: the best trial's config, for the pipeline to train and
test once. Trials never see the test split.

    python -m jobs.tune --config configs/ml100k.yaml --output-dir runs/ml100k-tune
    python -m jobs.pipeline --config runs/ml100k-tune/best_config.yaml --output-dir runs/best
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python -m jobs.tune \
        --config configs/ml100k.yaml --output-dir /shared/runs/tune --set data.root=/shared/ml100k
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from jobs import prepare
from jobs.cli import parse_job_args, user_errors
from jobs.ray_setup import ensure_ray
from pipeline.config import Config
from pipeline.run_dir import RunDir


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cfg: Config, run_dir: Path) -> dict:
    """Prepare when needed, search, write the best config; returns the search summary."""
    from training.tuning import best_config_path, run_search

    run_dir = Path(run_dir)
    # Tune's new console output prints an experiment box even at verbose=0; the classic
    # one stays silent and the search logs one line per trial (training.tuning). Ray's log
    # de-duplication would fold the trials' epoch lines into one (they differ in numbers).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    t0 = time.perf_counter()
    if not RunDir(run_dir).feature_state.exists():
        _log(f"[tune] {run_dir}/prepared is missing: preparing it first")
        prepare.run(cfg, run_dir)
    ensure_ray()
    summary = run_search(cfg, run_dir, log=_log)
    best = summary["best"]
    _log(f"[tune] {len(summary['trials'])} trials in {time.perf_counter() - t0:.0f}s; best "
         f"{summary['metric']} {best['best']:.4f} (validation, epoch {best['best_epoch']}, "
         f"{best['trial']})")
    _log(f"[tune] best config: {best_config_path(RunDir(run_dir))}; train and test it with\n"
         f"  python -m jobs.pipeline --config {best_config_path(RunDir(run_dir))} "
         "--output-dir RUN_DIR")
    return summary


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run."""
    cfg, run_dir = parse_job_args(__doc__, argv)
    with user_errors():
        run(cfg, run_dir)


if __name__ == "__main__":
    main()
