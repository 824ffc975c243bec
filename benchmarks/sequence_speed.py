r"""Towerline's sequence step beside the plain SASRec-CE reference, on the same windows.

Both train on one run's ``prepared/sequences/`` windows with the same shape: width, blocks,
heads, window length, batch (``train.batch_size`` windows a step) and the whole catalogue
as candidates; Towerline runs :func:`training.step.train_epoch` over its own batches
(shared padding cut; length-sorted pools with ``sequence.length_pools``), the reference
(:mod:`benchmarks.sasrec`) its padded windows. Both use torch's threads of this process.
Turns of ``--steps`` steps alternate (A B B A ...), so both see the same machine; a side's
figure is its samples (trained positions) over its seconds, summed over its turns.

    python -m benchmarks.sequence_speed --config configs/amazon_sports.yaml \
        --run-dir runs/amazon-sports --set data.root=data/amazon-sports
    python -m benchmarks.sequence_speed --tiny        # generated data (tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._measure import ROOT
from benchmarks.record import add_record_flag, save_record
from benchmarks.sasrec import Shape, build, step


def ours(cfg, run_dir: Path):
    """Towerline's training setup and an endless supply of its batches."""
    from training.data import epoch_batches, window_lengths
    from training.loop import setup

    s = setup(cfg, run_dir, torch.device("cpu"), world_size=1, rank=0)
    lengths = window_lengths(s.shard) if s.pools else None
    epochs = itertools.count()
    batches = itertools.chain.from_iterable(
        epoch_batches(s.shard, cfg.train.batch_size, cfg.train.seed, e, lengths) for e in epochs)
    return s, batches


def plain(cfg, run_dir: Path):
    """The reference of the same shape, its optimiser and an endless supply of batches."""
    import numpy as np

    from pipeline.run_dir import RunDir

    t = cfg.model.user.transformer
    shape = Shape(dim=t.dim, blocks=t.num_layers, heads=t.num_heads, dropout=t.dropout,
                  lr=cfg.train.lr, batch=cfg.train.batch_size)
    model, opt, ids, rows, catalogue_ids = build(RunDir(run_dir), shape)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            order = torch.from_numpy(rng.permutation(len(ids)))
            for b in order[:len(order) - len(order) % shape.batch].split(shape.batch):
                yield ids[b], rows[b]
    return model, opt, catalogue_ids, batches()


def turn_ours(s, batches, n: int) -> tuple[int, float]:
    """``n`` Towerline steps: (samples, seconds)."""
    from training.step import train_epoch

    stats = train_epoch(s.module, s.task, itertools.islice(batches, n), s.opt, s.scheduler,
                        s.cfg.train, s.device)
    return int(stats["rows"]), stats["seconds"]


def turn_plain(model, opt, catalogue_ids, batches, n: int) -> tuple[int, float]:
    """``n`` reference steps: (samples, seconds)."""
    start, samples = time.perf_counter(), 0
    for ids, rows in itertools.islice(batches, n):
        samples += step(model, opt, ids, rows, catalogue_ids)[1]
    return samples, time.perf_counter() - start


def compare(cfg, run_dir: Path, steps: int, turns: int) -> dict:
    """Alternate turns of both sides (A B B A ...); samples/s of each and their ratio."""
    s, our_batches = ours(cfg, run_dir)
    model, opt, catalogue_ids, plain_batches = plain(cfg, run_dir)
    turn_ours(s, our_batches, 2)  # warm-up, not counted
    turn_plain(model, opt, catalogue_ids, plain_batches, 2)
    totals = {"ours": [0, 0.0], "plain": [0, 0.0]}
    for i in range(turns):
        order = ("ours", "plain") if i % 2 == 0 else ("plain", "ours")
        for side in order:
            got = (turn_ours(s, our_batches, steps) if side == "ours" else
                   turn_plain(model, opt, catalogue_ids, plain_batches, steps))
            totals[side][0] += got[0]
            totals[side][1] += got[1]
    rate = {k: v[0] / v[1] for k, v in totals.items()}
    return {"ratio": round(rate["ours"] / rate["plain"], 3),
            "ours_samples_per_s": round(rate["ours"]), "plain_samples_per_s": round(rate["plain"]),
            "steps_per_turn": steps, "turns": turns, "threads": torch.get_num_threads(),
            "batch": cfg.train.batch_size, "windows": int(s.shard[next(iter(s.shard))].shape[0])}


def tiny_run(work: Path):
    """A tiny generated data set, prepared with the demo config: (config, run_dir)."""
    from pipeline.config import load_config
    from prepare.run import run_prepare
    from prepare.sources.demo import generate_demo_data

    generate_demo_data(str(work / "data"), seed=1, n_users=200, n_items=80,
                       n_interactions=5000)
    cfg = load_config(ROOT / "configs" / "demo.yaml", [
        f"data.root={work / 'data'}", "train.batch_size=16", "model.output_dim=16",
        "model.user.transformer.dim=16", "train.num_workers=0"])
    run_prepare(cfg, work / "run", log=lambda line: None, ray_data=False)
    return cfg, work / "run"


def main(argv: list[str] | None = None) -> dict:
    """Prepare if needed, compare both sides, print the figures, write the record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="The experiment config (sequence mode).")
    p.add_argument("--run-dir", help="A run directory whose prepared/ both sides train on.")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="Config overrides, e.g. --set data.root=data/amazon-sports.")
    p.add_argument("--steps", type=int, default=20, help="Steps per turn.")
    p.add_argument("--turns", type=int, default=4, help="Turns per side.")
    p.add_argument("--tiny", action="store_true", help="Tiny generated data (tests).")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "sequence_speed.json"))
    add_record_flag(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-seqspeed-") as tmp:
        if args.tiny:
            cfg, run_dir = tiny_run(Path(tmp))
            args.steps, args.turns = 3, 2
        else:
            from pipeline.config import load_config
            from prepare.run import run_prepare

            if not args.config or not args.run_dir:
                p.error("--config and --run-dir are needed (or --tiny)")
            cfg, run_dir = load_config(args.config, args.overrides), Path(args.run_dir)
            if not (run_dir / "prepared").is_dir():
                run_prepare(cfg, run_dir, ray_data=False)
        result = compare(cfg, run_dir, args.steps, args.turns)
    print(f"samples/s: Towerline {result['ours_samples_per_s']:,}, plain SASRec-CE "
          f"{result['plain_samples_per_s']:,}: ratio {result['ratio']:.2f}x "
          f"({result['threads']} threads, {result['batch']} windows a step)")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    setting = None if args.tiny else Path(args.config).stem
    save_record(args, "sequence_speed", result, module="benchmarks.sequence_speed",
                setting=setting)
    return result


if __name__ == "__main__":
    main()
