"""User state: replica memory and speed on the user-state store, next to the in-memory path.

One small trained demo run gives the model, the catalogue and the index; its audience is
then replaced by a generated one of N users (ids 0..N-1, each with the static features of a
real demo user and a history of 50 catalogue items drawn at random, their seen items those
50, and a random stored embedding), written as ``prepared/users.parquet``, the stored user
embeddings and the embedded store (``serve_app.store_build.build_embedded``, as
``jobs.build_index`` writes it). Each N is its own run directory.

1. **Replica memory.** For each N and each backend, a fresh process loads the
   :class:`~serve_app.retriever.Retriever` of that run (what a replica holds), answers
   1,000 ``/recommend`` requests of random known users in process, and reports its RSS
   (the replica's own state and libraries; Serve's actor machinery, the same for every
   backend, is not in it). The in-memory path (``serve.user_store: memory``, every user in
   every replica) runs up to ``MEMORY_UP_TO`` users; the embedded store at every N.
2. **Speed through Serve**, on the smallest N: one local Ray (2 CPUs), three applications
   of the same run behind the HAProxy ingress, one per backend (``/memory``,
   ``/embedded``, ``/redis``: a real ``redis-server`` on a free loopback port, started and
   stopped by PID here, loaded by ``jobs.user_store``'s function). ``/recommend`` of known,
   unchanged users at concurrency 1 and 16, the three taking turns (A B C C B A ...); the
   ratios are each store's p50 over the in-memory path's, from the same turns.
3. ``/events`` throughput on the embedded store (one event per request, concurrency 16,
   and lists of 100), and **event to effect**: the time from a 2xx on ``/events`` to the
   answer of the next ``/recommend`` for that user, which must show the event
   (``state_version`` 1).

    python -m benchmarks.user_state               # 10^5, 10^6, 10^7 users (~40 min, ~30 GB disk)
    python -m benchmarks.user_state --tiny        # 1,000 and 10,000 users, a minute (tests)
    python -m benchmarks.user_state --base-run runs/demo   # another trained run's model

Writes the record ``results/user_state.json`` (:mod:`benchmarks.record`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.record import add_record_flag, save_record

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"tiny": (1_000, 10_000), "full": (100_000, 1_000_000, 10_000_000)}
MEMORY_UP_TO = {"tiny": 10_000, "full": 1_000_000}  # users.parquet whole in each replica
HISTORY = 50
BATCH = 100_000  # generated users per write
REQUESTS = 1_000  # in-process requests before the RSS is read
SECONDS = {"tiny": 1.0, "full": 6.0}
ROUNDS = {"tiny": 2, "full": 3}
CONCURRENCY = (1, 16)
EFFECT_TRIES = {"tiny": 10, "full": 100}
BASE_SIZES = (300, 120, 9_000)  # the demo run that gives the model and the catalogue


# -- the audience -------------------------------------------------------------------------

def grow(base: Path, n: int, out: Path, seed: int = 0) -> Path:
    """``base`` with a generated audience of ``n`` users (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from indexing.embed import EMBEDDING, ROW
    from pipeline.arrow import column_to_numpy
    from pipeline.columns import SEEN, USER, column_name, tower_columns
    from pipeline.features import InputForm, spec_of
    from pipeline.run_dir import RunDir, load_fitted, read_model_meta
    from pipeline.transforms import vocab_index
    from serve_app.store_build import build_embedded

    if (out / "user_state" / "layout.json").exists():
        return out  # built by an earlier call with the same --work
    skip = shutil.ignore_patterns("users.parquet", "user_state", "mlruns", "train", "plain")
    shutil.copytree(base, out, ignore=skip, dirs_exist_ok=True)
    run = RunDir(out)
    meta = read_model_meta(run.model)
    fitted = load_fitted(run, meta)
    real = pq.read_table(RunDir(base).table(USER))
    columns = tower_columns(real.column_names, USER)
    catalogue = pq.read_table(run.table("item"))
    items = catalogue[fitted.item_id].to_pylist()
    sequences = {name: st for name, st in fitted.user.features.items()
                 if spec_of(st.type).form is InputForm.SEQUENCE}
    drawn_cols = {column_name(USER, name) for name in sequences} | {
        column_name(USER, name, f) for name, st in sequences.items() for f in st.item_features}
    static = {c: column_to_numpy(real[c]) for c in columns if c not in drawn_cols}
    vocab = {name: vocab_index(st).lookup(items) for name, st in sequences.items()}
    item_feats = {f: column_to_numpy(catalogue[column_name("item", f)])
                  for st in sequences.values() for f in st.item_features}
    rng = np.random.default_rng(seed)
    emb_dir = run.embeddings(USER, meta.model_version)
    shutil.rmtree(emb_dir, ignore_errors=True)
    emb_dir.mkdir(parents=True)
    dim = int(column_to_numpy(pq.read_table(RunDir(base).embeddings(USER, meta.model_version))
                              [EMBEDDING]).shape[1])
    embeddings = np.empty((n, dim), np.float32)
    writer = None
    for start in range(0, n, BATCH):
        b = min(BATCH, n - start)
        rows = rng.integers(0, len(items), (b, HISTORY))
        take = rng.integers(0, real.num_rows, b)
        cols = {c: a[take] for c, a in static.items()}
        for name, st in sequences.items():
            length = st.max_length
            laid = np.zeros((b, length), np.int64)
            at = np.full((b, length), -1, np.int64)
            keep = min(length, HISTORY)
            laid[:, length - keep:] = vocab[name][rows[:, -keep:]]
            at[:, length - keep:] = rows[:, -keep:]
            cols[column_name(USER, name)] = laid
            for f in st.item_features:
                cols[column_name(USER, name, f)] = np.where(at >= 0,
                                                            item_feats[f][np.maximum(at, 0)], 0)
        seen = np.sort(rows, axis=1)
        arrays = {fitted.user_id: pa.array(np.arange(start, start + b, dtype=np.int64))}
        for c in columns:
            a = cols[c]
            arrays[c] = (pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
                         if a.ndim == 2 else pa.array(a))
        arrays[SEEN] = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (b + 1) * HISTORY, HISTORY, dtype=np.int32)),
            pa.array(seen.reshape(-1)))
        table = pa.table(arrays)
        if writer is None:
            writer = pq.ParquetWriter(run.table(USER), table.schema)
        writer.write_table(table)
        emb = rng.standard_normal((b, dim), dtype=np.float32)
        embeddings[start:start + b] = emb
        pq.write_table(pa.table({fitted.user_id: arrays[fitted.user_id],
                                 ROW: pa.array(np.arange(start, start + b, dtype=np.int64)),
                                 EMBEDDING: pa.FixedSizeListArray.from_arrays(
                                     pa.array(emb.reshape(-1)), dim)}),
                       emb_dir / f"part-{start // BATCH:05d}.parquet")
    writer.close()
    build_embedded(run, fitted.user_id, meta.model_version, embeddings,
                   log=lambda m: None)
    return out


# -- 1. replica memory ---------------------------------------------------------------------

def rss_side(run_dir: Path, store: str, users: int) -> dict:
    """In this (fresh) process: load the run's Retriever, answer requests, read the RSS."""
    import psutil
    import torch

    from pipeline.config.serve import ServeConfig
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    torch.set_num_threads(1)
    before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r = Retriever(run_dir, ServeConfig(user_store=store, events_dir=tmp))
        load_s = time.perf_counter() - t0
        rng = np.random.default_rng(1)
        t1 = time.perf_counter()
        for u in rng.integers(0, users, REQUESTS).tolist():
            r.recommend_encoded([r.encode_recommend(RecommendRequest(user_id=u, k=10))])
        per_request_ms = (time.perf_counter() - t1) / REQUESTS * 1e3
        rss = psutil.Process().memory_info().rss
    return {"rss_mib": round(rss / 2**20, 1), "rss_before_load_mib": round(before / 2**20, 1),
            "load_s": round(load_s, 2), "in_process_ms_per_request": round(per_request_ms, 3)}


def run_rss(run_dir: Path, store: str, users: int) -> dict:
    """:func:`rss_side` in a subprocess of its own."""
    cmd = [sys.executable, "-m", "benchmarks.user_state", "--rss-side", str(run_dir),
           "--store", store, "--users", str(users)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=3600,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- 2. and 3. through Serve ----------------------------------------------------------------

def start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    """A redis-server on a free loopback port (stop it by its PID)."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(200):
        try:
            client.ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not answer within 10 s")


def serve_side(run_dir: Path, users: int, size: str, redis_url: str) -> dict:
    """One local Ray, three apps (one per backend); the load, events and event-to-effect."""
    from serve_app import environment

    environment.apply(environment.isolated_env("haproxy"))
    os.environ.update(RAY_AUTH_MODE="disabled", SERVE_SOCKET_REUSE_PORT_ENABLED="0")
    import pyarrow.parquet as pq
    import ray
    from ray import serve

    from benchmarks.loadgen import load
    from benchmarks.serve_latency import measure
    from pipeline.run_dir import RunDir
    from serve_app.app import app_config, bind_app, run_app

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=1 << 29, log_to_driver=False)
    try:
        port = environment.free_port()
        base = f"http://127.0.0.1:{port}"
        run_app(run_dir, {"port": port, "ingress": "haproxy", "user_store": "memory"},
                name="memory", route_prefix="/memory")
        for store in ("embedded", "redis"):
            _, cfg = app_config({"run_dir": str(run_dir), "user_store": store,
                                 "redis_url": redis_url})
            serve.run(bind_app(Path(run_dir).resolve(), cfg), name=store,
                      route_prefix=f"/{store}")
        rng = np.random.default_rng(2)
        bodies = [{"user_id": u, "k": 10} for u in rng.integers(0, users // 2, 1000).tolist()]
        urls = {s: f"{base}/{s}/recommend" for s in ("memory", "embedded", "redis")}
        result = measure(urls, bodies, CONCURRENCY, SECONDS[size], ROUNDS[size])
        # /events on the embedded store, on users the load above never asked for
        raw_items = pq.read_table(RunDir(run_dir).table("item"),
                                  columns=["item_id"])["item_id"].to_pylist()
        later = range(users // 2, users)
        one = [{"user_id": int(u), "item_id": raw_items[int(rng.integers(len(raw_items)))]}
               for u in rng.choice(later, min(1000, len(later)), replace=False)]
        hundred = [[{"user_id": int(u), "item_id": raw_items[int(i)]}
                    for u, i in zip(rng.choice(later, 100), rng.integers(len(raw_items), size=100),
                                    strict=True)] for _ in range(100)]
        single = load(f"{base}/embedded/events", one, 16, SECONDS[size])
        lists = load(f"{base}/embedded/events", hundred, 16, SECONDS[size])
        result["events"] = {"one_per_request_c16": single, "lists_of_100_c16": lists,
                            "events_per_s": round(single["rps"], 1),
                            "events_per_s_in_lists_of_100": round(lists["rps"] * 100, 1)}
        result["event_to_effect_ms"] = event_to_effect(base, raw_items, users,
                                                       EFFECT_TRIES[size], rng)
        return result
    finally:
        serve.shutdown()
        ray.shutdown()


def event_to_effect(base: str, items: list, users: int, tries: int,
                    rng: np.random.Generator) -> dict:
    """Per backend that takes events: 2xx on /events -> first /recommend that shows it."""
    import httpx

    out = {}
    with httpx.Client(timeout=30) as client:
        for store in ("embedded", "redis"):
            times, polls = [], []
            for u in rng.choice(range(users // 4), tries, replace=False).tolist():
                before = client.post(f"{base}/{store}/recommend", json={"user_id": u}).json()
                ok = client.post(f"{base}/{store}/events",
                                 json={"user_id": u, "item_id": items[0]})
                t0 = time.perf_counter()
                if ok.status_code != 200:
                    raise RuntimeError(f"/{store}/events answered {ok.status_code}: {ok.text}")
                needed, seen = 0, False
                while not seen and needed < 100:
                    got = client.post(f"{base}/{store}/recommend", json={"user_id": u}).json()
                    needed += 1
                    seen = got.get("state_version", 0) > before.get("state_version", 0)
                if not seen:
                    raise RuntimeError(f"/{store}: the event of user {u} never showed")
                times.append((time.perf_counter() - t0) * 1e3)
                polls.append(needed)
            out[store] = {"p50_ms": round(float(np.median(times)), 3),
                          "max_ms": round(float(np.max(times)), 3),
                          "recommends_needed_max": int(max(polls)), "tries": tries}
    return out


# -- the whole run --------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    """Build the audiences, measure, print and record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="1,000 and 10,000 users, short loads.")
    p.add_argument("--work", type=Path, help="Folder for the runs (kept; default: a temporary "
                   "one, removed), e.g. --work /tmp/user-state.")
    p.add_argument("--base-run", type=Path, help="A trained run whose model and catalogue "
                   "serve the generated audiences (default: a demo run built here), e.g. "
                   "--base-run runs/demo.")
    p.add_argument("--rss-side", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--users", type=int, help=argparse.SUPPRESS)
    add_record_flag(p)
    args = p.parse_args(argv)
    if args.rss_side:
        print(json.dumps(rss_side(args.rss_side, args.store, args.users)))
        return {}
    size = "tiny" if args.tiny else "full"
    work = args.work or Path(tempfile.mkdtemp(prefix="tl-user-state-"))
    try:
        from benchmarks.serve_latency import build_run

        t0 = time.perf_counter()
        base = args.base_run
        if base is None:
            base = build_run(work / "base", BASE_SIZES, ["index.local_max_rows=0"])
            import ray

            ray.shutdown()  # the build's Ray; the Serve side starts its own
        runs, build_s = {}, {}
        for n in SIZES[size]:
            t = time.perf_counter()
            runs[n] = grow(base, n, work / f"users-{n}")
            build_s[str(n)] = round(time.perf_counter() - t, 1)
            print(f"[user_state] {n:,} users generated and stored in {build_s[str(n)]} s",
                  flush=True)
        rss: dict[str, dict] = {"embedded": {}, "memory": {}}
        detail: dict[str, dict] = {"embedded": {}, "memory": {}}
        for n, run in runs.items():
            for store in ("embedded", "memory"):
                if store == "memory" and n > MEMORY_UP_TO[size]:
                    continue
                got = run_rss(run, store, n)
                detail[store][str(n)] = got
                rss[store][str(n)] = got.get("rss_mib")
                print(f"[user_state] {store} {n:,} users: {got}", flush=True)
        smallest = min(runs)
        proc, url = start_redis(work)
        try:
            from pipeline.run_dir import RunDir
            from serve_app.store_build import load_redis

            load_redis(RunDir(runs[smallest]), url, log=lambda m: None)
            served = serve_side(runs[smallest], smallest, size, url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        ratio = {s: {f"c{c}": round(served[s][f"c{c}"]["p50_ms"] / served["memory"][f"c{c}"]
                                    ["p50_ms"], 3) for c in CONCURRENCY}
                 for s in ("embedded", "redis")}
        sizes = sorted(rss["embedded"], key=int)
        figures = {
            "users": list(SIZES[size]), "history": HISTORY,
            "replica_rss_mib": rss, "rss_detail": detail, "build_s": build_s,
            "embedded_rss_growth_mib": round(rss["embedded"][sizes[-1]]
                                             - rss["embedded"][sizes[0]], 1),
            "known_user_p50_ratio": ratio,
            "recommend": {s: served[s] for s in ("memory", "embedded", "redis")},
            "events_per_s": served["events"]["events_per_s"],
            "events": served["events"],
            "event_to_effect_ms": served["event_to_effect_ms"],
            "served_users": smallest, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({k: figures[k] for k in ("replica_rss_mib", "embedded_rss_growth_mib",
                                                  "known_user_p50_ratio", "events_per_s",
                                                  "event_to_effect_ms")}, indent=1))
        save_record(args, "user_state", figures, module="benchmarks.user_state")
        return figures
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
