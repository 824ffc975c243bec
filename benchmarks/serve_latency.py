"""Serve latency: POST /recommend vs a bare Serve endpoint that returns a constant.

Both applications run side by side in one Serve instance on 127.0.0.1 (one replica each,
the run's ``serve`` config for ours, the same CPUs for the floor), and each gets the same
number of requests from an asyncio HTTP client at concurrency 1 and 16 after a warm-up.
The floor is what Serve's proxy and router cost on this machine; the ratios say what the
user tower, the index search and the request encoding add on top. The client shares the
machine's cores with the server, as a sidecar would.

    python -m benchmarks.serve_latency                       # builds a small demo run first
    python -m benchmarks.serve_latency --run-dir runs/ml100k # an existing run directory
    python -m benchmarks.serve_latency --tiny                # seconds; run by the tests

Prints one line per concurrency and writes ``benchmarks/results/serve_latency.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 16)
REQUESTS = {"tiny": 40, "full": 800}  # per side and concurrency
WARMUP = 10
DEMO_SIZES = {"tiny": (300, 120, 9_000), "full": (5_000, 2_000, 150_000)}
RUN_OVERRIDES = ["model.output_dim=32", "train.epochs=1", "train.batch_size=512",
                 "train.warmup_steps=5", "train.mlflow.enabled=false", "index.recall_users=200",
                 "index.recall_k=20"]
FLOOR_BODY = {"items": [], "model_version": "constant"}


def build_run(work: Path, size: str) -> Path:
    """Generate demo tables and run prepare -> plain training -> build_index on them."""
    from jobs import build_index
    from pipeline.config import load_config
    from pipeline.prepare import run_prepare
    from pipeline.sources.demo import generate_demo_data
    from training.loop import run_plain

    users, items, rows = DEMO_SIZES[size]
    data, run_dir = work / "data", work / "run"
    generate_demo_data(str(data), n_users=users, n_items=items, n_interactions=rows, seed=0)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"data.root={data}", *RUN_OVERRIDES])
    quiet = lambda m: None  # noqa: E731
    run_prepare(cfg, run_dir, log=quiet)
    run_plain(cfg, run_dir, log=quiet)
    build_index.run(cfg, run_dir)
    return run_dir


def floor_app(num_cpus: float, max_ongoing_requests: int):
    """A Serve deployment that reads the body and returns a constant: the overhead floor."""
    from ray import serve

    @serve.deployment(name="Floor", ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=max_ongoing_requests)
    class Floor:
        async def __call__(self, request) -> dict:
            await request.body()
            return FLOOR_BODY

    return Floor.bind()


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_apps(run_dir: Path) -> tuple[str, dict]:
    """Serve on a free 127.0.0.1 port with both apps; returns (base URL, server settings)."""
    from ray import serve

    from serve_app.app import deployment_options, run_app

    # the run's serve config, on a free local port: never the port of a running endpoint
    cfg = run_app(run_dir, {"host": "127.0.0.1", "port": free_port()})
    opts = deployment_options(cfg)
    serve.run(floor_app(cfg.num_cpus, opts["max_ongoing_requests"]), name="floor",
              route_prefix="/floor")
    settings = {"num_cpus": cfg.num_cpus, "max_batch_size": cfg.max_batch_size,
                "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                "max_ongoing_requests": opts["max_ongoing_requests"]}
    return f"http://{cfg.host}:{cfg.port}", settings


async def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    """Send every body (``concurrency`` at a time); latency percentiles and throughput."""
    import httpx

    latencies, failures, queue = [], [], list(reversed(bodies))
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60.0, limits=limits) as client:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(bodies)} requests to {url} failed, "
                           f"first: {failures[0]}")
    ms = np.asarray(latencies) * 1000
    return {"requests": len(bodies), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "rps": round(len(bodies) / wall, 1), "seconds": round(wall, 3)}


def measure(base: str, user_ids: list, n: int, concurrency: int) -> dict:
    """Floor and /recommend at one concurrency (warm-up first); figures and ratios."""
    bodies = [{"user_id": user_ids[i % len(user_ids)], "k": 10} for i in range(n)]
    out = {}
    for side, path in (("floor", "/floor"), ("recommend", "/recommend")):
        asyncio.run(_load(base + path, bodies[:WARMUP], concurrency))
        out[side] = asyncio.run(_load(base + path, bodies, concurrency))
    rec, floor = out["recommend"], out["floor"]
    out["ratio"] = {"p50": round(rec["p50_ms"] / floor["p50_ms"], 3),
                    "p99": round(rec["p99_ms"] / floor["p99_ms"], 3),
                    "rps": round(rec["rps"] / floor["rps"], 3)}
    return out


def known_users(run_dir: Path, count: int = 1000) -> list:
    """Up to ``count`` user ids of the run (requests cycle through them)."""
    import pyarrow.parquet as pq

    from pipeline.run_dir import RunDir

    table = pq.read_table(RunDir(run_dir).table("user"), columns=["user_id"])
    return table["user_id"].to_pylist()[:count]


def run(run_dir: Path, n: int) -> dict:
    """Start Ray (unless running) and Serve, measure both concurrencies, shut Serve down."""
    from ray import serve

    from jobs.ray_setup import ensure_ray

    ensure_ray()
    try:
        base, settings = start_apps(run_dir)
        users = known_users(run_dir)
        results = {f"c{c}": measure(base, users, n, c) for c in CONCURRENCY}
    finally:
        serve.shutdown()
    return {"run_dir": str(run_dir), "items": _item_count(run_dir), "users": len(users),
            "server": settings, **results}


def _item_count(run_dir: Path) -> int:
    """Catalogue size of the run."""
    import pyarrow.parquet as pq

    from pipeline.run_dir import RunDir

    return pq.read_metadata(RunDir(run_dir).table("item")).num_rows


def print_row(name: str, r: dict) -> None:
    """One concurrency's figures next to the floor's, with the ratios."""
    o, b, q = r["recommend"], r["floor"], r["ratio"]
    print(f"{name:4s} /recommend p50 {o['p50_ms']:7.2f} ms p99 {o['p99_ms']:7.2f} ms "
          f"{o['rps']:7.1f} req/s | floor p50 {b['p50_ms']:7.2f} ms p99 {b['p99_ms']:7.2f} ms "
          f"{b['rps']:7.1f} req/s | ratio p50 {q['p50']:.2f}x p99 {q['p99']:.2f}x "
          f"req/s {q['rps']:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (building a demo run unless --run-dir is given)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", help="A run directory with model/, index/ and prepared/.")
    p.add_argument("--tiny", action="store_true", help="Tiny run and few requests (tests).")
    p.add_argument("--requests", type=int, help="Requests per side and concurrency.")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "serve_latency.json"))
    args = p.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    n = args.requests or REQUESTS[size]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        if args.run_dir:
            run_dir = Path(args.run_dir).resolve()
        else:
            from jobs.ray_setup import ensure_ray

            ensure_ray()
            run_dir = build_run(Path(tmp), size)
        results = run(run_dir, n)
    if not args.run_dir:
        results["run_dir"] = f"built: demo {size} {DEMO_SIZES[size]}"
    for c in CONCURRENCY:
        print_row(f"c={c}", results[f"c{c}"])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
