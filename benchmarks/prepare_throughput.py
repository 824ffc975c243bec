"""Prepare throughput: the Ray Data prepare job vs a single-process pyarrow/numpy run.

Both sides run the same ``prepare.run.prepare_tables`` (split, fit, encode, write) on
the same inputs: the job reads and writes the splits through Ray Data, the baseline reads
with ``pyarrow.dataset`` and writes with ``pyarrow.parquet`` in one process.
Each side runs in its own subprocess, and
its peak memory is the largest sum of RSS over that subprocess's whole process tree
(Ray's raylet, object store and workers included), sampled every 0.1 s.

    python -m benchmarks.prepare_throughput                    # ML-100K and 10^7 demo rows
    python -m benchmarks.prepare_throughput --datasets ml100k  # one dataset
    python -m benchmarks.prepare_throughput --tiny             # seconds; run by the tests

Prints a table, writes ``benchmarks/results/prepare_throughput.json`` and one record per
data set, ``results/prepare_throughput-DATA.json`` (:mod:`benchmarks.record`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._measure import run_watched
from benchmarks.record import add_record_flag, save_record

ROOT = Path(__file__).resolve().parents[1]
ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
DEMO_SIZES = {"demo10m": (200_000, 50_000, 10_000_000), "tiny": (200, 100, 3_000)}


def make_inputs(name: str, work: Path) -> tuple[Path, Path]:
    """Create the tables and config for one dataset; returns (config path, data root)."""
    data = work / name
    if name == "ml100k":
        from prepare.sources.movielens import convert_movielens

        convert_movielens(str(ML100K), str(data))
        config = ROOT / "configs" / "ml100k.yaml"
    else:
        from prepare.sources.demo import generate_demo_data

        users, items, rows = DEMO_SIZES[name]
        generate_demo_data(str(data), n_users=users, n_items=items, n_interactions=rows, seed=0)
        config = ROOT / "configs" / "demo.yaml"
    return config, data


def run_side(side: str, config: Path, data: Path, out: Path) -> dict:
    """Run one side in a subprocess and watch its process tree's memory."""
    cmd = [sys.executable, "-m", "benchmarks.prepare_throughput", "--side", side,
           "--config", str(config), "--data", str(data), "--out", str(out)]
    watched = run_watched(cmd)
    if watched.returncode != 0:
        raise RuntimeError(f"{side} side failed with exit code {watched.returncode}")
    result = json.loads(watched.stdout.strip().splitlines()[-1])
    result["peak_rss_mib"] = watched.peak_rss_mib
    return result


def side_main(side: str, config: Path, data: Path, out: Path) -> None:
    """Inside the subprocess: run prepare one way and print its timing as JSON.

    Both sides run :func:`prepare.run.run_prepare` (one ``prepare_tables``): the
    Ray side reads and writes through Ray Data, the baseline with pyarrow in-process.
    """
    from pipeline.config import load_config
    from prepare.run import run_prepare

    cfg = load_config(config, [f"data.root={data}"])
    start = time.perf_counter()
    if side == "ray":
        from jobs.ray_setup import ensure_ray

        ensure_ray()
    manifest = run_prepare(cfg, out, log=_stderr, ray_data=side == "ray")
    rows = manifest.interactions_read
    seconds = time.perf_counter() - start
    print(json.dumps({"side": side, "rows": rows, "seconds": round(seconds, 3),
                      "rows_per_s": round(rows / seconds, 1)}))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (or one side of it, when --side is given)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=["ml100k", "demo10m"],
                   choices=["ml100k", "demo10m", "tiny"])
    p.add_argument("--tiny", action="store_true", help="Only the tiny generated dataset.")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "prepare_throughput.json"))
    add_record_flag(p)
    p.add_argument("--side", choices=["ray", "local"], help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        side_main(args.side, Path(args.config), Path(args.data), Path(args.out))
        return {}
    results = {}
    for name in (["tiny"] if args.tiny else args.datasets):
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            config, data = make_inputs(name, Path(tmp))
            ours = run_side("ray", config, data, Path(tmp) / "ray-run")
            base = run_side("local", config, data, Path(tmp) / "local-run")
        results[name] = {"ray_data": ours, "single_process": base,
                         "throughput_ratio": round(ours["rows_per_s"] / base["rows_per_s"], 3)}
        print_row(name, results[name])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    for name, figures in results.items():
        save_record(args, "prepare_throughput", figures, module="benchmarks.prepare_throughput",
                    setting=name)
    return results


def print_row(name: str, r: dict) -> None:
    """One dataset's figures next to the baseline."""
    o, b = r["ray_data"], r["single_process"]
    print(f"{name:8s} rows={o['rows']:>10,}  ray_data {o['rows_per_s']:>10,.0f} rows/s "
          f"({o['seconds']:.1f}s, peak {o['peak_rss_mib']:,.0f} MiB) | single-process "
          f"{b['rows_per_s']:>10,.0f} rows/s ({b['seconds']:.1f}s, peak "
          f"{b['peak_rss_mib']:,.0f} MiB) | ratio {r['throughput_ratio']:.2f}x")


if __name__ == "__main__":
    main()
