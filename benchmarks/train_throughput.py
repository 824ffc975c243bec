"""Train throughput: Ray Train with 1 and 2 workers vs the plain single-process loop.

All three sides train the same model from the same config over the same ``prepared/``
data (written once by ``jobs.prepare``) for the same epochs and per-worker batch size;
early stopping is switched off (``patience = epochs``) so every side runs every epoch,
and MLflow is off on every side. The plain side is ``training.loop.run_plain`` (what
``python -m jobs.train --no-ray`` runs), the others ``training.ray_train.fit`` with
``train.num_workers`` 1 and 2 (``train.cpus_per_worker`` from the config).

Samples/s is the training rows processed by all workers together divided by the time
spent in the training epochs (each epoch's ``train/rows`` is already the sum over workers,
its ``train/seconds`` the slowest worker's). Everything else in the call (worker-group
start, setup and reading the shards, checkpoint writes, teardown; for plain: setup,
reading the split, checkpoint writes) is ``startup_s``; validation is ``val_s``;
``ray.init`` is ``ray_init_s``; ``wall_s`` is the side's subprocess from start to exit.
Peak memory as in :mod:`benchmarks._measure`.

Threads: by default each side runs as the jobs do: plain torch uses every core, and each
Ray Train worker takes the node's CPUs shared among its workers (``threads`` column).
``--threads N`` sets ``OMP_NUM_THREADS=N`` and ``train.threads_per_worker=N`` on every
side.

    python -m benchmarks.train_throughput                 # ML-100K, configs/ml100k_rows.yaml
    python -m benchmarks.train_throughput --sequence      # ML-100K, the sequence mode
    python -m benchmarks.train_throughput --demo --epochs 2   # 10^6 generated interactions
    python -m benchmarks.train_throughput --epochs 3      # fewer epochs
    python -m benchmarks.train_throughput --threads 1     # one torch thread everywhere
    python -m benchmarks.train_throughput --sides plain ray_2_workers   # leave a side out
    python -m benchmarks.train_throughput --tiny          # seconds; run by the tests

Prints a table and writes ``benchmarks/results/train_throughput.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._measure import add_side_flags, run_watched, side_env
from benchmarks.record import add_record_flag, save_record

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
CONFIGS = {"ml100k": ROOT / "configs" / "ml100k_rows.yaml",
           "ml100k-sequence": ROOT / "configs" / "ml100k.yaml",
           "demo1m": ROOT / "configs" / "demo.yaml", "tiny": ROOT / "configs" / "tiny.yaml"}
DEMO_DATA = {  # generated demo sets: the 10^6-interaction one and the tests' tiny one
    "demo1m": {"n_users": 20_000, "n_items": 5_000, "n_interactions": 1_000_000},
    "tiny": {"n_users": 300, "n_items": 120, "n_interactions": 9000},
}
SIDES = {"plain": 0, "ray_1_worker": 1, "ray_2_workers": 2}


def make_data(name: str, work: Path) -> Path:
    """Write the raw tables for one dataset under ``work``; returns the data root."""
    data = work / "data"
    if name.startswith("ml100k"):
        from prepare.sources.movielens import convert_movielens

        convert_movielens(str(ML100K), str(data))
    else:
        from prepare.sources.demo import generate_demo_data

        generate_demo_data(str(data), seed=0, **DEMO_DATA[name])
    return data


def prepare(config: Path, overrides: list[str], run_dir: Path) -> Path:
    """``jobs.prepare`` in its own process (its Ray goes away with it); returns RUN_DIR."""
    cmd = [sys.executable, "-m", "jobs.prepare", "--config", str(config),
           "--output-dir", str(run_dir), *_set_flags(overrides)]
    subprocess.run(cmd, cwd=ROOT, env=side_env(), check=True, stdout=subprocess.DEVNULL)
    return run_dir


def _set_flags(overrides: list[str]) -> list[str]:
    return [flag for o in overrides for flag in ("--set", o)]


def run_side(side: str, config: Path, overrides: list[str], prepared: Path,
             work: Path, threads: int | None) -> dict:
    """Train one side in a subprocess; its figures plus wall time and peak memory."""
    result = work / f"{side}.json"
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--side", side,
           "--config", str(config), "--prepared", str(prepared), "--run-dir",
           str(work / side), "--result", str(result), *_set_flags(overrides)]
    env = side_env()
    if threads is not None:
        env = dict(env, OMP_NUM_THREADS=str(threads))
        cmd += ["--set", f"train.threads_per_worker={threads}"]
    watched = run_watched(cmd, env)
    if watched.returncode != 0:
        raise RuntimeError(f"{side} side failed with exit code {watched.returncode}")
    figures = json.loads(result.read_text())
    figures.update(peak_rss_mib=watched.peak_rss_mib, wall_s=watched.wall_s)
    return figures


def side_main(side: str, config: Path, overrides: list[str], prepared: Path,
              run_dir: Path, result: Path) -> None:
    """Inside the subprocess: train one way and write its figures as JSON."""
    from pipeline.config import load_config

    workers = SIDES[side]
    cfg = load_config(config, [*overrides, f"train.num_workers={workers}"])
    shutil.copytree(prepared / "prepared", run_dir / "prepared")
    ray_init_s = 0.0
    if workers:
        from jobs.ray_setup import ensure_ray
        from training.ray_train import fit

        t0 = time.perf_counter()
        ensure_ray()
        ray_init_s = time.perf_counter() - t0
        start = time.perf_counter()
        out = fit(cfg, run_dir, log=_log)
    else:
        from training.loop import run_plain

        start = time.perf_counter()
        out = run_plain(cfg, run_dir, log=_log)
    fit_s = time.perf_counter() - start
    figures = epoch_figures(out["history"], fit_s)
    figures.update(side=side, workers=workers, ray_init_s=round(ray_init_s, 3),
                   torch_threads=int(out["history"][-1]["train/threads"]))
    result.write_text(json.dumps(figures))


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def epoch_figures(history: list[dict], fit_s: float) -> dict:
    """Samples/s over the training epochs only, and where the rest of the call went."""
    rows = sum(int(m["train/rows"]) for m in history)
    train_s = sum(m["train/seconds"] for m in history)
    val_s = sum(m["val/seconds"] for m in history)
    return {"epochs": len(history), "rows": rows, "train_s": round(train_s, 3),
            "samples_per_s": round(rows / train_s, 1), "val_s": round(val_s, 3),
            "fit_s": round(fit_s, 3), "startup_s": round(fit_s - train_s - val_s, 3),
            "epoch_seconds": [round(m["train/seconds"], 3) for m in history]}


def bench(name: str, epochs: int | None, threads: int | None,
          sides: tuple[str, ...] = tuple(SIDES)) -> dict:
    """Prepare one dataset once, then train it the three ways (or the ``sides`` given)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-train-{name}-") as tmp:
        work = Path(tmp)
        overrides = [f"data.root={make_data(name, work)}", "train.mlflow.enabled=false"]
        start = time.perf_counter()
        prepared = prepare(CONFIGS[name], overrides, work / "prepared-run")
        prepare_s = time.perf_counter() - start
        if epochs is None:
            from pipeline.config import load_config

            epochs = load_config(CONFIGS[name], overrides).train.epochs
        overrides += [f"train.epochs={epochs}", f"train.patience={epochs}"]
        figures = {s: run_side(s, CONFIGS[name], overrides, prepared, work, threads)
                   for s in ("plain", *[s for s in sides if s != "plain"])}
    plain = figures["plain"]["samples_per_s"]
    ratios = {f"ratio_{s}": round(figures[s]["samples_per_s"] / plain, 3)
              for s in figures if s != "plain"}
    return {**figures, **ratios, "prepare_s": round(prepare_s, 3)}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (or one side of it, when --side is given)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="A tiny generated demo set instead.")
    p.add_argument("--demo", action="store_true",
                   help="The generated 10^6-interaction demo set (configs/demo.yaml) instead.")
    p.add_argument("--sequence", action="store_true",
                   help="ML-100K in the sequence mode (configs/ml100k.yaml) instead.")
    p.add_argument("--epochs", type=int, help="Epochs on every side (default: the config's).")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for every side.")
    p.add_argument("--sides", nargs="+", choices=list(SIDES), default=list(SIDES),
                   help="Sides to run (the plain baseline always runs).")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "train_throughput.json"))
    add_record_flag(p)
    add_side_flags(p, SIDES)
    args = p.parse_args(argv)
    if args.side:
        side_main(args.side, Path(args.config), args.overrides, Path(args.prepared),
                  Path(args.run_dir), Path(args.result))
        return {}
    name = ("tiny" if args.tiny else "demo1m" if args.demo
            else "ml100k-sequence" if args.sequence else "ml100k")
    results = {name: bench(name, args.epochs, args.threads, tuple(args.sides))}
    print_table(name, results[name])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    save_record(args, "train_throughput", results[name], module="benchmarks.train_throughput",
                setting=name)
    return results


def print_table(name: str, r: dict) -> None:
    """Each side's figures, the Ray sides next to the plain baseline."""
    print(f"{name}: {r['plain']['epochs']} epochs per side; samples/s = rows over the "
          f"training epochs' seconds (all workers)")
    print(f"{'side':14s} {'threads':>7s} {'rows':>9s} {'samples/s':>10s} {'vs plain':>8s} "
          f"{'train_s':>8s} {'val_s':>6s} {'startup_s':>9s} {'ray_init_s':>10s} "
          f"{'wall_s':>7s} {'peak MiB':>9s}")
    for side in (s for s in SIDES if s in r):
        s = r[side]
        print(f"{side:14s} {s['torch_threads']:>7d} {s['rows']:>9,} {s['samples_per_s']:>10,.0f} "
              f"{r.get(f'ratio_{side}', 1.0):>7.2f}x {s['train_s']:>8.1f} {s['val_s']:>6.1f} "
              f"{s['startup_s']:>9.1f} {s['ray_init_s']:>10.1f} {s['wall_s']:>7.1f} "
              f"{s['peak_rss_mib']:>9,.0f}")


if __name__ == "__main__":
    main()
