"""Retrieval quality: the whole pipeline per seed, next to tuned EASE and ALS on the same split.

Each seed runs, in a fresh subprocess and timed as a whole, exactly what a user runs:
``python -m jobs.pipeline --config CONFIG`` (prepare -> train -> build_index ->
evaluate) on the data set's tables written to a temporary folder (never inside the
repository). Tuned EASE and tuned implicit ALS (:mod:`benchmarks.baselines`) are fitted on
the first run's ``prepared/`` split, so every row ranks the same targets with the same
metric code (test targets, masked, exact, as ``../shared/EVALUATION.md`` defines them).

Data sets (``--data``):

- ``ml100k``: ``../shared/data/ml-100k`` converted, ``configs/ml100k.yaml``; the reference
  rows of EVALUATION.md (RecBole's SASRec included) are printed too;
- ``demo-long``: generated MovieLens-like long histories (``--regime long``),
  ``configs/demo.yaml``;
- ``demo-sparse``: generated e-commerce-like short histories, day-level time, no user
  features (``--regime sparse``), ``configs/demo_sparse.yaml``;
- ``amazon-sports``: ``../shared/data/amazon-sports`` (ids only, the line order is the time)
  converted by ``jobs.convert_sequences``, ``configs/amazon_sports.yaml``; the published
  figures of ``PROVENANCE.md`` are printed too.

Beside EASE and ALS, the plain SASRec-CE reference (:mod:`benchmarks.sasrec`) is trained on
the same prepared windows and tuned on validation (``--sasrec-dropout``; ``--no-sasrec``
skips it). A config with ``train.refit`` has no validation figures of its own: its settings
were chosen on validation with refit off (docs/experiments.md); its test row is the model
refit on training + validation, as EASE's and ALS's test rows are, and the SASRec
reference is then refit the same way.

    python -m benchmarks.quality --data demo-sparse          # seeds 0 1 2
    python -m benchmarks.quality --data ml100k --seeds 0     # one seed
    python -m benchmarks.quality --tiny                      # tiny demo data (tests)

Writes the record ``results/quality-DATA.json`` (:mod:`benchmarks.record`).
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

from benchmarks.record import add_record_flag, save_record
from pipeline.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
AMAZON_SPORTS = ROOT.parent / "shared" / "data" / "amazon-sports" / "Sports_and_Outdoors.txt"
METRICS = ("HR@10", "HR@50", "HR@100", "NDCG@10")
# EVALUATION.md, ML-100K test targets, masked (HR@10, HR@50, HR@100, NDCG@10).
REFERENCES = {
    "RecBole 1.2.1 SASRec": (0.210, 0.499, 0.675, 0.110),
    "plain-PyTorch causal transformer": (0.221, 0.503, None, 0.113),
    "implicit ALS, tuned": (0.144, 0.380, 0.528, 0.076),
    "EASE, tuned": (0.143, 0.391, 0.557, 0.073),
    "most popular items": (0.086, 0.199, 0.319, 0.045),
}
# PROVENANCE.md of the Amazon file, the same split and protocol (HR@10, -, -, NDCG@10).
AMAZON_REFERENCES = {
    "SASRec + sampled softmax (published)": (0.0569, None, None, 0.0314),
    "eSASRec (published)": (0.0560, None, None, 0.0323),
    "ActionPiece (published)": (0.0500, None, None, 0.0264),
    "HSTU (published)": (0.0437, None, None, 0.0243),
}
DATASETS = {  # name -> (config, demo regime, or None for a converted shared file)
    "ml100k": ("ml100k.yaml", None),
    "demo-long": ("demo.yaml", "long"),
    "demo-sparse": ("demo_sparse.yaml", "sparse"),
    "amazon-sports": ("amazon_sports.yaml", None),
}
TINY_OVERRIDES = ["train.epochs=2", "train.batch_size=64", "model.output_dim=16",
                  "train.mlflow.enabled=false", "index.recall_users=50"]


def make_data(name: str, work: Path, tiny: bool) -> tuple[Path, Path]:
    """Input tables and config of a data set; returns (config, data root)."""
    data = work / "data"
    config, regime = DATASETS[name]
    if tiny or regime is not None:
        from prepare.sources.demo import generate_demo_data

        sizes = {"n_users": 200, "n_items": 80, "n_interactions": 5000} if tiny else {}
        generate_demo_data(str(data), seed=1, regime=regime or "default", **sizes)
        return ROOT / "configs" / ("demo.yaml" if tiny else config), data
    if name == "amazon-sports":
        from prepare.sources.sequences import convert_sequences

        if not AMAZON_SPORTS.exists():
            raise SystemExit(f"Amazon Sports not found at {AMAZON_SPORTS}")
        convert_sequences(str(AMAZON_SPORTS), str(data))
        return ROOT / "configs" / config, data
    from prepare.sources.movielens import convert_movielens

    if not ML100K.exists():
        raise SystemExit(f"MovieLens-100K not found at {ML100K}")
    convert_movielens(str(ML100K), str(data))
    return ROOT / "configs" / config, data


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
            "validation": metrics.get("validation"),  # none for a refit model
            "trained_on": metrics.get("trained_on", ["train"]),
            "index_recall": metrics["index_recall"]}


def _figures(run: dict, split: str, kind: str) -> dict[str, float]:
    """One run's exact figures: masked, unmasked or over new targets only."""
    metrics = run[split]
    return {"masked": metrics["exact"], "unmasked": metrics["unmasked"]["exact"],
            "new_targets": metrics["new_targets"]}[kind]


def summarise(runs: list[dict], split: str = "test", kind: str = "masked") -> dict | None:
    """Mean and standard deviation of each exact metric over seeds (masked by default).

    None when the runs have no such figures (a refit model has no validation ones).
    """
    if any(r.get(split) is None for r in runs):
        return None
    out = {}
    for m in METRICS:
        values = [_figures(r, split, kind)[m] for r in runs]
        out[m] = {"mean": statistics.fmean(values),
                  "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "min": min(values), "max": max(values)}
    out["wall_s"] = {"mean": statistics.fmean(r["wall_s"] for r in runs),
                     "max": max(r["wall_s"] for r in runs)}
    return out


def _cells(values) -> str:
    return " | ".join("" if v is None else f"{v:.4f}" for v in values)


def print_table(runs: list[dict], summary: dict, baselines: list[dict],
                references: dict | None) -> None:
    """Per-seed rows, mean +- std, the baselines on the same split, and references."""
    print("| model (test, masked, exact) | " + " | ".join(METRICS) + " | wall s |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    refit = " (refit on train + validation)" if "validation" in runs[0]["trained_on"] else ""
    for r in runs:
        t = r["test"]["exact"]
        print(f"| Towerline{refit} seed {r['seed']} | {_cells(t[m] for m in METRICS)} "
              f"| {r['wall_s']:.0f} |")
    print("| **Towerline mean +- std** | " + " | ".join(
        f"{summary[m]['mean']:.4f} +- {summary[m]['std']:.4f}" for m in METRICS)
        + f" | {summary['wall_s']['mean']:.0f} |")
    for b in baselines:
        print(f"| {b['model']} {b['params']} (same split) | "
              f"{_cells(b['test'][m] for m in METRICS)} | {b['seconds']:.0f} |")
    for name, ref in (references or {}).items():
        print(f"| {name} (EVALUATION.md) | {_cells(ref)} | |")
    share = runs[0]["test"]["new_targets"]["share"]
    if share < 1.0:  # some targets repeat a history item: the masked figures favour them
        print(f"\n{1 - share:.1%} of the test targets are items already in the user's "
              "history; masked, each is the one history item left in the ranking. The same "
              "runs, unmasked (history items ranked too) and masked over the other targets "
              "alone:\n")
        print("| model (test, exact) | " + " | ".join(
            f"{kind} {m}" for kind in ("unmasked", "new targets") for m in ("HR@10", "NDCG@10"))
            + " |")
        print("|---|" + "---|" * 4)
        means = [statistics.fmean(_figures(r, "test", kind)[m] for r in runs)
                 for kind in ("unmasked", "new_targets") for m in ("HR@10", "NDCG@10")]
        print(f"| Towerline, mean of {len(runs)} | {_cells(means)} |")
        for b in baselines:
            cells = _cells(b[key][m] for key in ("test_unmasked", "test_new_targets")
                           for m in ("HR@10", "NDCG@10"))
            print(f"| {b['model']} | {cells} |")


def main(argv: list[str] | None = None) -> dict:
    """Run the seeds and the baselines, print the table, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=sorted(DATASETS), default="ml100k")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tiny", action="store_true", help="Tiny demo data, one seed, 2 epochs.")
    p.add_argument("--no-baselines", action="store_true", help="Skip EASE and ALS.")
    p.add_argument("--no-sasrec", action="store_true", help="Skip the SASRec-CE reference.")
    p.add_argument("--sasrec-dropout", type=float, nargs="+", default=[0.2, 0.5],
                   help="SASRec-CE dropouts tried (chosen on validation NDCG@10).")
    p.add_argument("--sasrec-epochs", type=int, default=100,
                   help="SASRec-CE epochs at most (patience 10).")
    p.add_argument("--sasrec-negatives", type=int, nargs="+", default=[0],
                   help="SASRec softmax: 0 the full catalogue, N uniform sampled negatives "
                   "(a grid, chosen on validation), e.g. 256 for 18,357 items.")
    p.add_argument("--ease-lambdas", type=float, nargs="+", default=None,
                   help="EASE lambdas tried (default benchmarks.baselines.EASE_LAMBDAS; "
                   "each costs an [I, I] inverse, about 2 minutes at 18,357 items).")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="Extra config overrides for every seed.")
    p.add_argument("--output", help="JSON path (default benchmarks/results/quality-DATA.json).")
    add_record_flag(p)
    args = p.parse_args(argv)
    seeds = args.seeds[:1] if args.tiny else args.seeds
    extra = (TINY_OVERRIDES if args.tiny else []) + args.overrides
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        config, data = make_data(args.data, Path(tmp), args.tiny)
        runs = [run_seed(config, data, Path(tmp) / f"run-{s}", s, extra) for s in seeds]
        first = Path(tmp) / f"run-{seeds[0]}"
        baselines = []
        if not args.no_baselines:
            from benchmarks.baselines import run_baselines

            baselines = run_baselines(first, args.ease_lambdas)
        if not args.no_sasrec:
            cfg = load_config(config, [f"data.root={data}", *extra])
            baselines.append(sasrec_row(first, args, cfg))
    summary = summarise(runs)
    references = None if args.tiny else {"ml100k": REFERENCES,
                                          "amazon-sports": AMAZON_REFERENCES}.get(args.data)
    print_table(runs, summary, baselines, references)
    dataset = "tiny-demo" if args.tiny else args.data
    result = {"dataset": dataset, "config": str(config), "overrides": extra, "runs": runs,
              "summary": summary, "validation_summary": summarise(runs, "validation"),
              "unmasked_summary": summarise(runs, kind="unmasked"),
              "baselines": baselines}
    if runs[0]["test"]["new_targets"]["share"] > 0:
        result["new_targets_summary"] = summarise(runs, kind="new_targets")
    if references:
        result["references"] = {k: dict(zip(METRICS, v, strict=True))
                                for k, v in references.items()}
    out = Path(args.output or ROOT / "benchmarks" / "results" / f"quality-{dataset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    save_record(args, "quality", result, module="benchmarks.quality", setting=dataset)
    return result


def sasrec_row(run_dir: Path, args: argparse.Namespace, cfg: Config) -> dict:
    """The SASRec-CE reference on the first seed's prepared windows, as a baseline row.

    When the family is refit (``train.refit``), the reference is too: its grid and epoch
    are chosen on windows of the training split alone (prepared beside the run), then it
    trains again for that many epochs on the run's windows and is scored on test.
    """
    from benchmarks.sasrec import Shape, train, tune
    from prepare.run import run_prepare

    grid = {"dropout": args.sasrec_dropout, "negatives": args.sasrec_negatives,
            "epochs": [2 if args.tiny else args.sasrec_epochs]}
    start = time.perf_counter()
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    chosen_on = run_dir
    if cfg.train.refit:
        chosen_on = run_dir.parent / "sasrec-selection"
        run_prepare(cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"refit": False})}), chosen_on, log=log, ray_data=False)
    r = tune(chosen_on, grid, log=log)
    if cfg.train.refit:
        shape = Shape(**{**r["shape"], "epochs": r["best_epoch"]})
        r = {**r, "test": train(run_dir, shape, log, validate=False)["test"]}
    return {"model": "SASRec-CE (benchmarks/sasrec.py)", "params": r["shape"],
            "validation": r["validation"], "test": r["test"]["masked"],
            "test_unmasked": r["test"]["unmasked"], "test_new_targets": r["test"]["new_targets"],
            "tried": [{"params": t["shape"], "NDCG@10": t["validation"]["NDCG@10"]}
                      for t in r["tried"]],
            "best_epoch": r["best_epoch"], "refit": cfg.train.refit,
            "samples_per_s": r["samples_per_s"], "seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    main()
