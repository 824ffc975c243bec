"""Retrieval quality on MovieLens-100K: the whole pipeline per seed, next to the references.

Each seed runs, in a fresh subprocess and timed as a whole, exactly what a user runs:
``python -m jobs.pipeline --config configs/ml100k.yaml`` (prepare -> Ray Train ->
build_index -> evaluate) on the files in ``../shared/data/ml-100k`` converted to a
temporary folder (never inside the repository). It prints the test figures (masked,
exact, as ``../shared/EVALUATION.md`` defines them) per seed, their mean and standard
deviation, and the reference rows of EVALUATION.md beside them.

    python -m benchmarks.ml100k_quality                  # seeds 0 1 2
    python -m benchmarks.ml100k_quality --seeds 0        # one seed
    python -m benchmarks.ml100k_quality --tiny           # tiny demo data, 1 seed (tests)

Writes ``benchmarks/results/ml100k_quality.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
METRICS = ("HR@10", "HR@50", "HR@100", "NDCG@10")
# EVALUATION.md, test targets, masked (HR@10, HR@50, HR@100, NDCG@10).
REFERENCES = {
    "most popular items": (0.086, 0.199, 0.319, 0.045),
    "implicit ALS, tuned": (0.144, 0.380, 0.528, 0.076),
    "EASE, tuned": (0.143, 0.391, 0.557, 0.073),
}
TINY_OVERRIDES = ["train.epochs=2", "train.batch_size=256", "model.output_dim=16",
                  "train.mlflow.enabled=false", "index.recall_users=50"]


def make_data(work: Path, tiny: bool) -> tuple[Path, Path]:
    """Input tables and config for the run; returns (config, data root)."""
    data = work / "data"
    if tiny:
        from pipeline.sources.demo import generate_demo_data

        generate_demo_data(str(data), n_users=200, n_items=80, n_interactions=5000, seed=1)
        return ROOT / "configs" / "demo.yaml", data
    from pipeline.sources.movielens import convert_movielens

    if not ML100K.exists():
        raise SystemExit(f"MovieLens-100K not found at {ML100K}")
    convert_movielens(str(ML100K), str(data))
    return ROOT / "configs" / "ml100k.yaml", data


def run_seed(config: Path, data: Path, run_dir: Path, seed: int, extra: list[str]) -> dict:
    """One full pipeline run in a subprocess; returns its metrics and wall time."""
    sets = [f"data.root={data}", f"train.seed={seed}", *extra]
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", str(config),
           "--output-dir", str(run_dir), *[a for s in sets for a in ("--set", s)]]
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"seed": seed, "wall_s": round(seconds, 1), "test": metrics["test"],
            "validation": metrics["validation"], "index_recall": metrics["index_recall"]}


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation of each masked exact test metric over seeds."""
    out = {}
    for m in METRICS:
        values = [r["test"]["exact"][m] for r in runs]
        out[m] = {"mean": statistics.fmean(values),
                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "min": min(values), "max": max(values)}
    out["wall_s"] = {"mean": statistics.fmean(r["wall_s"] for r in runs),
                     "max": max(r["wall_s"] for r in runs)}
    return out


def print_table(runs: list[dict], summary: dict) -> None:
    """Per-seed rows, mean +- std, and the reference rows."""
    print("| model | " + " | ".join(METRICS) + " | wall s |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for r in runs:
        t = r["test"]["exact"]
        print(f"| Towerline seed {r['seed']} | " + " | ".join(f"{t[m]:.4f}" for m in METRICS)
              + f" | {r['wall_s']:.0f} |")
    print("| **Towerline mean +- std** | " + " | ".join(
        f"{summary[m]['mean']:.4f} +- {summary[m]['std']:.4f}" for m in METRICS)
        + f" | {summary['wall_s']['mean']:.0f} |")
    for name, ref in REFERENCES.items():
        print(f"| {name} (EVALUATION.md) | " + " | ".join(f"{v:.3f}" for v in ref) + " | |")


def main(argv: list[str] | None = None) -> dict:
    """Run the seeds and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tiny", action="store_true", help="Tiny demo data, one seed, 2 epochs.")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="Extra config overrides for every seed.")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "ml100k_quality.json"))
    args = p.parse_args(argv)
    seeds = args.seeds[:1] if args.tiny else args.seeds
    extra = (TINY_OVERRIDES if args.tiny else []) + args.overrides
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        config, data = make_data(Path(tmp), args.tiny)
        runs = [run_seed(config, data, Path(tmp) / f"run-{s}", s, extra) for s in seeds]
    summary = summarise(runs)
    print_table(runs, summary)
    result = {"dataset": "tiny-demo" if args.tiny else "ml-100k", "config": str(config),
              "overrides": extra, "runs": runs, "summary": summary}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
