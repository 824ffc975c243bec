"""Index types: Flat, HNSW, IVF and IVF-PQ on generated clustered vectors, vs exact search.

Items and queries are drawn from one mixture of Gaussian clusters (``sqrt(N)`` clusters,
at least 64; dim 64), L2-normalised, and searched with cosine similarity through
``indexing.topk.store.build_topk`` (the project's interface). Isotropic random vectors would make
IVF recall collapse (RAY_NOTES), hence the clusters. The items are generated in chunks of
10^5 rows, so the only full-size array is the ``[N, 64]`` float32 catalogue itself.

For each index type: build time (train + add), recall@100 against the exact oracle
(``ExactTopK``, brute force in torch) on 500 queries, queries/s one query per call and
1,000 queries per call through ``TopK.search`` (what serving pays: normalisation, id map
and per-row filtering), and the batched figure again through the raw faiss index. Each
speed figure runs until its query count or its time budget is spent, after one warm-up
call. Flat is the baseline of the speed-up column. FAISS and torch use ``--threads``
threads with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it: on a shared
2-core machine, spinning OpenMP threads made one-query Flat search 100x slower and an
IVF-PQ build 10x slower than one thread did.

    python -m benchmarks.index_types                                # 10^5 and 10^6 items
    python -m benchmarks.index_types --sizes 100000                 # one size
    python -m benchmarks.index_types --sizes 1000000 --ef-construction 20
    python -m benchmarks.index_types --tiny                         # 10^4; run by the tests

Prints a table per size, writes ``benchmarks/results/index_types.json`` and one record per
size, ``results/index_types-N.json`` (:mod:`benchmarks.record`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.record import add_record_flag, save_record

ROOT = Path(__file__).resolve().parents[1]
DIM = 64
K = 100
CHUNK_ROWS = 100_000
SPREAD = 0.6  # per-dimension noise around a unit-variance cluster centre
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per list


@dataclass(frozen=True)
class Budget:
    """How many queries each measurement may use, and for how long."""

    recall_queries: int = 500
    single_queries: int = 2_000
    single_s: float = 5.0
    batch_queries: int = 5_000
    batch_size: int = 1_000
    batch_s: float = 10.0


TINY_BUDGET = Budget(recall_queries=500, single_queries=300, single_s=1.0,
                     batch_queries=2_000, batch_s=2.0)


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """``n`` unit vectors around randomly chosen ``centres``; returns [n, D] float32."""
    from indexing.topk.kernels import l2_normalize

    out = np.empty((n, centres.shape[1]), np.float32)
    for lo in range(0, n, CHUNK_ROWS):
        hi = min(n, lo + CHUNK_ROWS)
        pick = rng.integers(len(centres), size=hi - lo)
        noise = rng.standard_normal((hi - lo, centres.shape[1]), dtype=np.float32)
        out[lo:hi] = l2_normalize(centres[pick] + SPREAD * noise)
    return out


def make_data(n: int, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items [n, D] and queries [n_queries, D] from one cluster mixture."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(64, int(math.sqrt(n))), DIM), dtype=np.float32)
    return clustered(rng, centres, n), clustered(rng, centres, n_queries)


def index_specs(n: int, pq_m: int, ef_construction: int) -> dict[str, tuple[str, dict]]:
    """Index type -> (faiss factory string, parameters) for ``n`` items."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))
    return {
        "Flat": ("Flat", {}),
        "HNSW32": ("HNSW32", {"efConstruction": ef_construction, "efSearch": 128}),
        "IVF": (f"IVF{nlist},Flat", {"nprobe": 16}),
        # "np": no polysemous training (~35-60 s at any N here); it only serves
        # polysemous_ht filtering, which is off, so the search results are the same
        "IVF-PQ": (f"IVF{nlist},PQ{pq_m}np", {"nprobe": 16}),
    }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's true top-k ids that were found; [Q, k] ids each."""
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth, strict=True))
    return hits / truth.size


def queries_per_s(search: Callable[[np.ndarray], object], queries: np.ndarray,
                  per_call: int, budget_s: float) -> float:
    """Queries/s of ``search`` over ``queries`` in calls of ``per_call``, time-bounded."""
    search(queries[:per_call])  # warm-up: first-touch allocations, thread pool start
    done, start = 0, time.perf_counter()
    for lo in range(0, len(queries), per_call):
        search(queries[lo:lo + per_call])
        done += len(queries[lo:lo + per_call])
        if time.perf_counter() - start > budget_s:
            break
    return done / (time.perf_counter() - start)


def measure(name: str, factory: str, params: dict, items: np.ndarray, ids: np.ndarray,
            queries: np.ndarray, truth: np.ndarray, budget: Budget) -> dict:
    """Build one index type and measure it."""
    import faiss

    from indexing.topk.store import build_topk

    start = time.perf_counter()
    topk = build_topk(items, ids, "cosine", factory, params)
    build_s = time.perf_counter() - start
    _, found = topk.search(queries[:budget.recall_queries], K)

    def raw(q: np.ndarray):
        return topk.index.search(q, K)

    def ours(q: np.ndarray):
        return topk.search(q, K)

    return {
        "factory": factory, "params": params, "build_s": round(build_s, 3),
        "recall_at_100": round(recall_at_k(found, truth), 5),
        "single_qps": round(queries_per_s(ours, queries[:budget.single_queries], 1,
                                          budget.single_s), 1),
        "batch_qps": round(queries_per_s(ours, queries[:budget.batch_queries],
                                         budget.batch_size, budget.batch_s), 1),
        "batch_qps_faiss": round(queries_per_s(raw, queries[:budget.batch_queries],
                                               budget.batch_size, budget.batch_s), 1),
        "size_mib": round(faiss.serialize_index(topk.index).nbytes / 2**20, 1),
    }


def bench_size(n: int, budget: Budget, pq_m: int, ef_construction: int, seed: int) -> dict:
    """Every index type at ``n`` items, against the exact oracle."""
    from indexing.topk.exact import ExactTopK

    n_queries = max(budget.recall_queries, budget.single_queries, budget.batch_queries)
    start = time.perf_counter()
    items, queries = make_data(n, n_queries, seed)
    ids = np.arange(n, dtype=np.int64)
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    _, truth = ExactTopK(items, ids, "cosine").search(queries[:budget.recall_queries], K)
    exact_s = time.perf_counter() - start
    indexes = {}
    for name, (factory, params) in index_specs(n, pq_m, ef_construction).items():
        indexes[name] = measure(name, factory, params, items, ids, queries, truth, budget)
        print(f"  {name}: built in {indexes[name]['build_s']:.1f}s", flush=True)
    flat = indexes["Flat"]["batch_qps_faiss"]
    for r in indexes.values():
        r["speedup_vs_flat"] = round(r["batch_qps_faiss"] / flat, 2)
    return {"items": n, "dim": DIM, "k": K, "recall_queries": budget.recall_queries,
            "generate_s": round(generate_s, 3), "exact_s": round(exact_s, 3),
            "indexes": indexes}


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark for each size and print a table per size."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000],
                   help="Catalogue sizes N.")
    p.add_argument("--tiny", action="store_true", help="10^4 items, small query budgets.")
    p.add_argument("--pq-m", type=int, default=16, help="PQ sub-quantizers of IVF-PQ.")
    p.add_argument("--ef-construction", type=int, default=40,
                   help="HNSW efConstruction (faiss's default is 40).")
    p.add_argument("--threads", type=int, default=2, help="FAISS and torch threads.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "index_types.json"))
    add_record_flag(p)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when libgomp loads
    import faiss
    import torch

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    sizes, budget = ([10_000], TINY_BUDGET) if args.tiny else (args.sizes, Budget())
    results = {}
    for n in sizes:
        print(f"N={n:,}: generating, exact oracle, building ...", flush=True)
        results[str(n)] = bench_size(n, budget, args.pq_m, args.ef_construction, args.seed)
        results[str(n)].update(threads=args.threads,
                               omp_wait_policy=os.environ["OMP_WAIT_POLICY"])
        print_table(results[str(n)])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    for n, figures in results.items():
        save_record(args, "index_types", figures, module="benchmarks.index_types", setting=n)
    return results


def print_table(r: dict) -> None:
    """One size: every index type next to the Flat baseline."""
    print(f"N={r['items']:,} dim={r['dim']} cosine, recall@{r['k']} on {r['recall_queries']} "
          f"queries vs exact (oracle {r['exact_s']:.1f}s)")
    print(f"{'index':8s} {'factory':16s} {'build_s':>8s} {'recall':>7s} {'single q/s':>10s} "
          f"{'batch q/s':>10s} {'faiss q/s':>10s} {'vs Flat':>8s} {'MiB':>7s}")
    for name, x in r["indexes"].items():
        print(f"{name:8s} {x['factory']:16s} {x['build_s']:>8.1f} {x['recall_at_100']:>7.4f} "
              f"{x['single_qps']:>10,.0f} {x['batch_qps']:>10,.0f} "
              f"{x['batch_qps_faiss']:>10,.0f} {x['speedup_vs_flat']:>7.2f}x "
              f"{x['size_mib']:>7,.1f}")


if __name__ == "__main__":
    main()
