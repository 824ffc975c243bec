"""Where one training epoch's time goes: the plain loop vs Ray Train with 2 workers.

Both sides train the same config over the same ``prepared/`` data with the functions the
jobs use (``training.loop.setup`` and ``train_one_epoch``), one warm-up epoch and then one
measured epoch, with clocks wrapped around (no change to the step itself):

- ``data``: taking the next batch from the worker's in-memory shard;
- ``forward + loss``: the task's loss, the candidates' all-gather included;
- ``optimizer``: AdamW's step;
- ``backward + clip``: the rest of the step (DDP's gradient all-reduce runs inside it);
- ``collectives``: the loss's all-gathers (forward) and its gradient all-reduce (backward)
  on their own, part of the parts above; and, measured apart, one all-reduce of every
  parameter as DDP sends them;
- epoch end: combining the figures over workers, validation (rank 0), checkpoint + report.

Ray Data's per-batch iteration (``iter_torch_batches`` over a materialised shard, what the
workers read before) is timed on the same rows, without training, as the old path's
baseline. Per-step figures are milliseconds; rank 0's clocks for Ray Train.

    python -m benchmarks.train_profile            # ML-100K, configs/ml100k.yaml
    python -m benchmarks.train_profile --tiny     # seconds; run by the tests

Prints a table and writes ``benchmarks/results/train_profile.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks._measure import add_side_flags, run_watched, side_env
from benchmarks.record import add_record_flag, save_record
from benchmarks.train_throughput import CONFIGS, make_data, prepare

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("plain", "ray_2_workers")
PARTS = ("data", "forward + loss", "backward + clip", "optimizer")


class Clock:
    """Seconds summed per name."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        """Count ``seconds`` under ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def wrap(self, name: str, fn: Callable) -> Callable:
        """``fn`` with its calls' time counted under ``name``."""
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)
        return timed

    def iterate(self, name: str, items: Iterator) -> Iterator:
        """``items`` with the time of each ``next`` counted under ``name``."""
        while True:
            t0 = time.perf_counter()
            try:
                item = next(items)
            except StopIteration:
                return
            self.add(name, time.perf_counter() - t0)
            yield item


def instrument(s, clock: Clock) -> None:
    """Clocks around the batch source, the loss, the optimizer step and the collectives."""
    import torch.distributed as dist

    import training.distributed as D
    import training.loop as L

    batches = L.epoch_batches
    L.epoch_batches = lambda *a, **k: clock.iterate("data", batches(*a, **k))
    s.task.loss = clock.wrap("forward + loss", s.task.loss)
    s.opt.step = clock.wrap("optimizer", s.opt.step)

    class TimedDist:
        def __getattr__(self, name):
            fn = getattr(dist, name)
            return clock.wrap("collectives (loss)", fn) if name.startswith("all_") else fn

    D.dist = TimedDist()


def profile_epoch(s, world: int) -> dict:
    """One warm-up epoch, then one measured epoch; per-epoch seconds and per-step ms."""
    import torch

    from training import checkpoint as ckpt
    from training.loop import train_one_epoch

    state = ckpt.TrainState()
    train_one_epoch(s, state)
    state.epoch += 1
    clock = Clock()
    instrument(s, clock)
    t0 = time.perf_counter()
    stats = train_one_epoch(s, state)
    total = time.perf_counter() - t0
    parts = {k: clock.seconds.get(k, 0.0) for k in ("data", "forward + loss", "optimizer")}
    parts["backward + clip"] = total - sum(parts.values())
    parts["collectives (loss)"] = clock.seconds.get("collectives (loss)", 0.0)
    steps = int(stats["steps"])
    return {"world": world, "threads": torch.get_num_threads(), "steps": steps,
            "rows": int(stats["rows"]), "epoch_s": round(total, 3),
            "samples_per_s": round(stats["rows"] / total, 1),
            "seconds": {k: round(v, 3) for k, v in parts.items()},
            "ms_per_step": {k: round(1000 * v / steps, 3) for k, v in parts.items()},
            "ddp_allreduce_ms": ddp_allreduce_ms(s.model, world)}


def ddp_allreduce_ms(model, world: int, repeat: int = 20) -> float:
    """Milliseconds of one all-reduce of all parameters (what DDP sends per step)."""
    import torch
    import torch.distributed as dist

    if world == 1:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    dist.all_reduce(flat)
    t0 = time.perf_counter()
    for _ in range(repeat):
        dist.all_reduce(flat)
    return round(1000 * (time.perf_counter() - t0) / repeat, 3)


def epoch_end(s, state, stats) -> dict[str, float]:
    """Seconds of validation and of checkpoint + report on rank 0 (``ray`` ranks only)."""
    import tempfile as tf

    import ray.train

    from training.loop import checkpoint_meta, finish_epoch

    out = {}
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({})
        return out
    t0 = time.perf_counter()
    metrics, is_best, _ = finish_epoch(s, state, stats)
    out["validation"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tf.TemporaryDirectory() as tmp:
        s.save(Path(tmp), state, checkpoint_meta(s, metrics, is_best))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    out["checkpoint + report"] = time.perf_counter() - t0
    return out


def ray_worker(loop_config: dict) -> None:
    """A Ray Train worker: the real setup, a profiled epoch, the old data path's time."""
    import ray.train
    import ray.train.torch
    import torch

    from pipeline.config import parse_config
    from training import checkpoint as ckpt
    from training.loop import setup, train_one_epoch
    from training.ray_train import DDP_KWARGS, worker_threads

    cfg = parse_config(loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(worker_threads(cfg.train, ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    s = setup(cfg, Path(loop_config["run_dir"]), device, world, rank,
              wrap=lambda m: ray.train.torch.prepare_model(
                  m, parallel_strategy_kwargs=DDP_KWARGS))
    figures = profile_epoch(s, world)
    state = ckpt.TrainState(epoch=2)
    figures["epoch_end_s"] = {k: round(v, 3) for k, v in
                              epoch_end(s, state, train_one_epoch(s, state)).items()}
    figures["ray_data_iteration_s"] = ray_data_epoch(cfg.train.batch_size, device)
    if rank == 0:
        Path(loop_config["result"]).write_text(json.dumps(figures))


def ray_data_epoch(batch_size: int, device) -> float:
    """Seconds to iterate this worker's Ray Data shard once as torch batches (no training)."""
    import ray.train

    shard = ray.train.get_dataset_shard("train")
    t0 = time.perf_counter()
    for _ in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                      local_shuffle_buffer_size=4 * batch_size):
        pass
    return round(time.perf_counter() - t0, 3)


def side_main(side: str, config: Path, overrides: list[str], prepared: Path,
              run_dir: Path, result: Path) -> None:
    """Inside the subprocess: profile one side and write its figures as JSON."""
    from pipeline.config import load_config

    cfg = load_config(config, overrides)
    shutil.copytree(prepared / "prepared", run_dir / "prepared")
    if side == "plain":
        import torch

        from training.loop import setup

        s = setup(cfg, run_dir, torch.device("cpu"), world_size=1, rank=0)
        result.write_text(json.dumps(profile_epoch(s, 1)))
        return
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from jobs.ray_setup import ensure_ray
    from pipeline.columns import model_columns
    from pipeline.run_dir import RunDir
    from training.ray_train import RUN_NAME

    ensure_ray()
    ds = ray.data.read_parquet(str(RunDir(run_dir).split("train")))
    ds = ds.select_columns(model_columns(ds.schema().names)).materialize()
    TorchTrainer(
        ray_worker, datasets={"train": ds},
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(run_dir.resolve()),
                           "result": str(result)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=2, resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=RUN_NAME, storage_path=str(run_dir.resolve()),
                                       logging_config=ray.train.LoggingConfig("WARNING")),
    ).fit()


def bench(name: str) -> dict:
    """Prepare once, profile both sides, each in its own process."""
    with tempfile.TemporaryDirectory(prefix=f"bench-profile-{name}-") as tmp:
        work = Path(tmp)
        overrides = [f"data.root={make_data(name, work)}", "train.mlflow.enabled=false"]
        prepared = prepare(CONFIGS[name], overrides, work / "prepared-run")
        sides = {}
        for side in SIDES:
            result = work / f"{side}.json"
            cmd = [sys.executable, "-m", "benchmarks.train_profile", "--side", side,
                   "--config", str(CONFIGS[name]), "--prepared", str(prepared),
                   "--run-dir", str(work / side), "--result", str(result),
                   *[f for o in overrides for f in ("--set", o)]]
            watched = run_watched(cmd, side_env())
            if watched.returncode != 0:
                raise RuntimeError(f"{side} side failed with exit code {watched.returncode}")
            sides[side] = json.loads(result.read_text())
    return sides


def print_table(name: str, sides: dict) -> None:
    """Per-step milliseconds of each part, Ray Train next to the plain loop."""
    plain, ray2 = sides["plain"], sides["ray_2_workers"]
    print(f"{name}: one epoch after a warm-up; ms per step (rank 0 for Ray Train); "
          f"steps {plain['steps']} (plain) / {ray2['steps']} (each worker)")
    print(f"{'part':32s} {'plain':>9s} {'ray 2 workers':>14s}")
    for part in (*PARTS, "collectives (loss)"):
        print(f"{part:32s} {plain['ms_per_step'][part]:>9.2f} {ray2['ms_per_step'][part]:>14.2f}")
    print(f"{'DDP all-reduce of all params':32s} {'':>9s} {ray2['ddp_allreduce_ms']:>14.2f}")
    # train_one_epoch's figures are already the whole group's (rows summed over workers)
    print(f"{'samples/s (all workers)':32s} {plain['samples_per_s']:>9,.0f} "
          f"{ray2['samples_per_s']:>14,.0f}")
    print(f"{'torch threads per process':32s} {plain['threads']:>9d} {ray2['threads']:>14d}")
    end = ray2["epoch_end_s"]
    print(f"epoch end (rank 0, s): validation {end.get('validation', 0):.2f}, checkpoint + "
          f"report {end.get('checkpoint + report', 0):.2f}; Ray Data iteration of the same "
          f"shard without training: {ray2['ray_data_iteration_s']:.2f}s vs in-memory "
          f"shard's data part {ray2['seconds']['data']:.2f}s")


def main(argv: list[str] | None = None) -> dict:
    """Run the profile (or one side of it, when --side is given)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="A tiny generated demo set instead.")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "train_profile.json"))
    add_record_flag(p)
    add_side_flags(p, SIDES)
    args = p.parse_args(argv)
    if args.side:
        side_main(args.side, Path(args.config), args.overrides, Path(args.prepared),
                  Path(args.run_dir), Path(args.result))
        return {}
    name = "tiny" if args.tiny else "ml100k"
    results = {name: bench(name)}
    print_table(name, results[name])
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")
    save_record(args, "train_profile", results[name], module="benchmarks.train_profile",
                setting=name)
    return results


if __name__ == "__main__":
    main()
