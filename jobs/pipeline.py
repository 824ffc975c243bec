r"""Pipeline: Parquet tables -> prepare -> train -> build_index -> evaluate, in one job.

Inputs: the whole config. Outputs: everything the four jobs write under RUN_DIR
(``prepared/``, ``train/``, ``model/``, ``embeddings/``, ``index/``, ``metrics.json``), the
run's ``serve.yaml`` (``serve_app.deploy_config``) and a summary: the metrics table, the
artifact paths and the command that serves the run.

    python -m jobs.pipeline --config configs/demo.yaml --output-dir runs/demo
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.pipeline --config configs/demo.yaml --output-dir /shared/runs/demo
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from jobs import build_index, evaluate, prepare, train
from jobs.cli import job_parser, load_job_config, user_errors
from pipeline.config import Config
from serve_app.deploy_config import write_deploy_config

STEPS: tuple[tuple[str, Callable[[Config, Path], object]], ...] = (
    ("prepare", prepare.run),
    ("train", train.run),
    ("build_index", build_index.run),
    ("evaluate", evaluate.run),
)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cfg: Config, run_dir: Path, skip: tuple[str, ...] = ()) -> dict:
    """Run every step in order (those in ``skip`` are left out); returns ``metrics.json``."""
    run_dir = Path(run_dir)
    seconds = {}
    for i, (name, step) in enumerate(STEPS, 1):
        if name in skip:
            continue
        _log(f"[pipeline] step {i}/{len(STEPS)}: {name}")
        t0 = time.perf_counter()
        step(cfg, run_dir)
        seconds[name] = round(time.perf_counter() - t0, 1)
        _log(f"[pipeline] {name} done in {seconds[name]}s")
    metrics = evaluate.read_metrics(run_dir)
    serve_file, url = write_deploy_config(run_dir)
    print(summary(metrics, run_dir, seconds, serve_file, url))
    return metrics


def summary(metrics: dict, run_dir: Path, seconds: dict[str, float], serve_file: Path,
            url: str) -> str:
    """The closing report: metrics table, artifacts, timings and the serve command.

    ``serve_file`` is the run's deploy config (its ``http_options`` keep the endpoint on
    ``serve.host``, 127.0.0.1 by default), ``url`` where it answers.
    """
    rows = ["| split | scored | HR@10 | HR@50 | HR@100 | NDCG@10 |", "|---|---|---|---|---|---|"]
    for split in [s for s in ("validation", "test") if s in metrics]:  # refit: test only
        for how in ("exact", "index", "popularity"):
            m = metrics[split][how]
            name = "most popular (baseline)" if how == "popularity" else how
            rows.append(f"| {split} | {name} | {m['HR@10']:.4f} | {m['HR@50']:.4f} | "
                        f"{m['HR@100']:.4f} | {m['NDCG@10']:.4f} |")
    recall = {k: v for k, v in metrics["index_recall"].items() if k.startswith("recall@")}
    run_dir = Path(run_dir).resolve()
    lines = [
        "", f"Towerline run {run_dir} (model {metrics['model_version']})",
        "Masked full-catalogue metrics (../shared/EVALUATION.md), the model trained on "
        + " + ".join(metrics.get("trained_on", ["train"])) + ":", *rows,
        f"Index {metrics['index_recall']['index_type']}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in recall.items()),
        "Seconds per step: " + ", ".join(f"{k} {v}" for k, v in seconds.items()),
        "Artifacts: " + ", ".join(str(run_dir / p) for p in
                                  ("prepared", "model", "index", "embeddings", "metrics.json")),
        f"Serve it:  serve run {serve_file.resolve()}   (answers at {url})",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run."""
    parser = job_parser(__doc__)
    parser.add_argument("--skip", nargs="*", default=[], choices=[n for n, _ in STEPS],
                        help="Steps to leave out, e.g. --skip prepare (when it already ran).")
    args = parser.parse_args(argv)
    cfg = load_job_config(args)
    with user_errors():
        run(cfg, Path(args.output_dir), skip=tuple(args.skip))


if __name__ == "__main__":
    main()
