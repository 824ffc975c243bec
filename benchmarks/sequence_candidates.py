"""Full softmax against sampled softmax in the sequence mode: step time and memory by catalogue.

One training step (forward + backward of :class:`~training.sequence.SequenceTask` on a
causal transformer user tower and an id-table item tower, B windows of L positions, every
position trained) is timed for each catalogue size with every item as a candidate (full
softmax) and with the positions' positives plus ``--negatives`` shared sampled negatives
(sampled softmax, log-Q corrected). Each side runs in its own subprocess so its peak RSS is
its own. The rule ``sequence.full_softmax_max_items`` is set from this table.

    python -m benchmarks.sequence_candidates                          # 2k .. 200k items
    python -m benchmarks.sequence_candidates --items 2000 50000 --steps 5
    python -m benchmarks.sequence_candidates --tiny                   # tests

Writes ``benchmarks/results/sequence_candidates.json`` and the record
``results/sequence_candidates.json`` (:mod:`benchmarks.record`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks._measure import ROOT, run_watched
from benchmarks.record import add_record_flag, save_record


def step_seconds(items: int, full: bool, negatives: int, batch: int, length: int,
                 steps: int, dim: int) -> dict:
    """Seconds per training step (median of ``steps`` after one warm-up step)."""
    import numpy as np
    import torch

    from pipeline.columns import SEQUENCE_ITEMS, SEQUENCE_WEIGHTS
    from pipeline.config import parse_config
    from pipeline.state import FeatureState, FeatureStateSet, TowerState
    from towers.model import build_two_tower
    from training.sequence import SequenceTask, SequenceTrainModule, history_keys

    torch.manual_seed(0)
    rows = items + 2  # vocabulary + padding + out-of-vocabulary
    item_id = FeatureState(type="categorical", source="item_id", num_embeddings=rows,
                           embedding_dim=dim, vocab=list(range(items)), vocab_type="int64")
    history = FeatureState(type="sequence", source="history", num_embeddings=rows,
                           embedding_dim=dim, max_length=length, vocab_of="item_id")
    fitted = FeatureStateSet(user=TowerState({"history": history}),
                             item=TowerState({"item_id": item_id}),
                             user_id="user_id", item_id="item_id")
    cfg = parse_config({
        "data": {"interactions": "-", "users": "-", "items": "-"},
        "features": {"user": [{"name": "history", "type": "sequence", "max_length": length,
                               "embedding_dim": dim}],
                     "item": [{"name": "item_id", "type": "categorical",
                               "embedding_dim": dim}]},
        "model": {"output_dim": dim, "user": {"type": "transformer", "mlp": {"hidden": []},
                                              "transformer": {"dim": dim, "causal": True}},
                  "item": {"mlp": {"hidden": []}}},
        "sequence": {"objective": "clm", "candidates": "full" if full else "sampled"},
        "loss": {"extra_negatives": 0 if full else negatives},
    })
    model = build_two_tower(cfg.model, fitted, cfg.plan)
    module = SequenceTrainModule(model)
    catalogue = {"item__item_id": torch.arange(2, rows)}  # catalogue row r -> id r + 2
    task = SequenceTask(cfg, np.ones(items), catalogue, history_keys(model), seed=0)
    window = torch.randint(0, items, (batch, length + 1))
    batch_ = {"user__history": window + 2, SEQUENCE_ITEMS: window,
              SEQUENCE_WEIGHTS: torch.ones(batch, length + 1)}
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss, _ = task.loss(module, batch_)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    median = float(np.median(times[1:]))
    return {"items": items, "full": full, "step_s": round(median, 4),
            "positions_per_s": round(batch * length / median, 1),
            "threads": torch.get_num_threads()}


def run_side(args: argparse.Namespace, items: int, full: bool) -> dict:
    """One (catalogue size, candidates) side in a watched subprocess."""
    cmd = [sys.executable, "-m", "benchmarks.sequence_candidates", "--side",
           "--items", str(items), "--batch", str(args.batch), "--length", str(args.length),
           "--steps", str(args.steps), "--negatives", str(args.negatives),
           "--dim", str(args.dim)] + (["--full"] if full else [])
    watched = run_watched(cmd)
    if watched.returncode != 0:
        raise RuntimeError(f"side items={items} full={full} failed (exit {watched.returncode})")
    out = json.loads(watched.stdout.strip().splitlines()[-1])
    out["peak_rss_mib"] = watched.peak_rss_mib
    return out


def main(argv: list[str] | None = None) -> dict:
    """Time every (catalogue size, full / sampled) pair and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, nargs="+", default=[2000, 10_000, 50_000, 200_000])
    p.add_argument("--batch", type=int, default=128, help="Windows per step.")
    p.add_argument("--length", type=int, default=50, help="Positions per window (L).")
    p.add_argument("--negatives", type=int, default=1024, help="Sampled side's negatives.")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="Two small catalogues, short windows.")
    add_record_flag(p)
    p.add_argument("--side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--full", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" /
                                           "sequence_candidates.json"))
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps(step_seconds(args.items[0], args.full, args.negatives, args.batch,
                                      args.length, args.steps, args.dim)))
        return {}
    if args.tiny:
        args.items, args.batch, args.length, args.steps, args.dim = [500, 3000], 8, 10, 2, 16
    rows = []
    print(f"B={args.batch} windows x L={args.length} positions per step, dim {args.dim}; "
          f"sampled = in-batch positives + {args.negatives} shared negatives")
    print(f"{'items':>8s} {'full ms':>9s} {'sampled ms':>11s} {'full/sampled':>12s} "
          f"{'full MiB':>9s} {'sampled MiB':>12s}")
    for items in args.items:
        full, sampled = run_side(args, items, True), run_side(args, items, False)
        ratio = full["step_s"] / sampled["step_s"]
        rows.append({"items": items, "full": full, "sampled": sampled,
                     "full_over_sampled": round(ratio, 3)})
        print(f"{items:>8,} {1000 * full['step_s']:>9.1f} {1000 * sampled['step_s']:>11.1f} "
              f"{ratio:>12.2f} {full['peak_rss_mib']:>9,.0f} {sampled['peak_rss_mib']:>12,.0f}")
    result = {"batch": args.batch, "length": args.length, "negatives": args.negatives,
              "dim": args.dim, "rows": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    save_record(args, "sequence_candidates", result, module="benchmarks.sequence_candidates")
    return result


if __name__ == "__main__":
    main()
