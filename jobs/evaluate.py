r"""Evaluate: ``RUN_DIR/model`` + ``RUN_DIR/index`` -> ``RUN_DIR/metrics.json``.

Test and validation targets ranked over the whole catalogue as ``../shared/EVALUATION.md``
defines it: exact (brute force, the reference) and through the index; masked (history
removed) as the primary figures, unmasked alongside; the most-popular baseline scored
the same way; plus the index's recall@K against exact search on every test user. The
model's own config (saved with it) decides the similarity; ``--config`` is read for the
common flags only.

    python -m jobs.evaluate --config configs/ml100k.yaml --output-dir runs/ml100k
    ray job submit --working-dir . -- python -m jobs.evaluate \
        --config configs/ml100k.yaml --output-dir /shared/runs/ml100k
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from indexing.evaluate import evaluate_run
from jobs.cli import parse_job_args, user_errors
from pipeline.config import Config
from pipeline.run_dir import RunDir


def run(cfg: Config, run_dir: Path) -> dict:
    """Compute and write ``metrics.json``; returns it."""
    out = evaluate_run(run_dir)
    t, r = out["test"]["exact"], out["index_recall"]
    recall = next(v for k, v in r.items() if k.startswith("recall@"))
    print(f"[evaluate] test (masked, exact): HR@10 {t['HR@10']:.4f} HR@50 {t['HR@50']:.4f} "
          f"HR@100 {t['HR@100']:.4f} NDCG@10 {t['NDCG@10']:.4f} (most popular: HR@10 "
          f"{out['test']['popularity']['HR@10']:.4f}); index ({r['index_type']}) "
          f"recall {recall:.4f} -> {RunDir(run_dir).metrics}", file=sys.stderr)
    return out


def read_metrics(run_dir: Path) -> dict:
    """``RUN_DIR/metrics.json`` as written by :func:`run`."""
    path = RunDir(run_dir).metrics
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.evaluate` first")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run."""
    cfg, run_dir = parse_job_args(__doc__, argv)
    with user_errors():
        run(cfg, run_dir)


if __name__ == "__main__":
    main()
