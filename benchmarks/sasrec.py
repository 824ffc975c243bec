"""A plain SASRec with cross-entropy (SASRec-CE): the peer every sequence figure stands beside.

About 60 lines of model and loop in plain PyTorch, written from the papers (Kang & McAuley
2018; Klenitskiy & Vasilev 2023), sharing nothing with Towerline but its prepared split:
item ids only, learned positions, pre-norm causal transformer blocks, the item table tied
as the output layer, a dot product, and a full softmax over the catalogue at every
position of every training window. It trains on the run's ``prepared/sequences/`` windows
(the windows Towerline trains on), picks its epoch on the validation targets with
patience, and is scored on the test targets by ``indexing.metrics`` (masked, exact), the
code that scores Towerline. Beside a refit Towerline (``train.refit``) it is refit the same
way: chosen on windows of the training split, then trained again for the chosen epochs on
the refit run's windows (training + validation) and scored on test
(``train(..., validate=False)``).

    python -m benchmarks.sasrec RUN_DIR                        # default shape
    python -m benchmarks.sasrec RUN_DIR --dropout 0.2 0.5      # a grid, chosen on validation
    python -m benchmarks.sasrec RUN_DIR --negatives 256        # SASRec with sampled softmax

The default shape is EVALUATION.md's reference (2 blocks, width 64, dropout 0.3, batch 128
windows, Adam 1e-3, full softmax). ``--negatives N`` replaces the full softmax by the
literature's sampled one (SASRec+SS): at every position the target against N catalogue
items drawn uniformly per step and shared by the batch, a drawn item equal to the
position's target left out; uniform draws need no log-Q correction. Large catalogues
(Amazon's 18,357 items) train several times faster that way. Each step also cuts the
leading columns that are padding in every window of its batch: a real position never
attends to padding, so the loss is the same.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import nn

from indexing.eval_set import load_eval_set
from indexing.metrics import retrieval_metrics
from pipeline.columns import SEQUENCE_ITEMS
from pipeline.run_dir import RunDir, read_catalogue


@dataclass(frozen=True)
class Shape:
    """The reference's hyper-parameters."""

    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.3
    lr: float = 1e-3
    batch: int = 128
    epochs: int = 200
    patience: int = 10
    negatives: int = 0  # 0: full softmax; N: uniform sampled softmax with N negatives
    seed: int = 0


class SASRec(nn.Module):
    """Causal transformer over item ids; scores are dot products with the item table."""

    def __init__(self, vocab: int, length: int, s: Shape):
        super().__init__()
        self.items = nn.Embedding(vocab, s.dim, padding_idx=0)
        self.pos = nn.Embedding(length, s.dim)
        layer = nn.TransformerEncoderLayer(s.dim, s.heads, s.dim * 4, s.dropout,
                                           batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, s.blocks, enable_nested_tensor=False)
        self.norm, self.drop = nn.LayerNorm(s.dim), nn.Dropout(s.dropout)
        # One scale for both tables: positions at nn.Embedding's N(0, 1) drowned the items
        # (ML-100K validation NDCG@10 at epoch 10: 0.035 with them, 0.079 without).
        for table in (self.items, self.pos):
            nn.init.normal_(table.weight, std=0.02)
        with torch.no_grad():
            self.items.weight[0].zero_()  # padding

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] vocabulary ids (0 = padding, in front) -> [B, L, D] states."""
        n = ids.shape[1]
        x = self.drop(self.items(ids) + self.pos.weight[-n:])
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).triu(1)
        pad = (ids == 0) & (torch.arange(n, device=ids.device) < n - 1)  # keep one key
        return self.norm(self.body(x, mask=causal, src_key_padding_mask=pad))


def load_windows(run: RunDir) -> tuple[torch.Tensor, torch.Tensor]:
    """The training windows: [N, L + 1] vocabulary ids and catalogue rows (-1 padding)."""
    table = pq.read_table(run.split("sequences"), columns=["user__history", SEQUENCE_ITEMS])
    ids = np.stack(table.column("user__history").to_numpy(zero_copy_only=False))
    rows = np.stack(table.column(SEQUENCE_ITEMS).to_numpy(zero_copy_only=False))
    return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(rows.astype(np.int64))


def step(model: SASRec, opt: torch.optim.Optimizer, ids: torch.Tensor, rows: torch.Tensor,
         catalogue_ids: torch.Tensor, negatives: int = 0,
         generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """One step on [B, L + 1] windows: a softmax at every real position; (loss, positions).

    ``negatives`` 0 scores the whole catalogue; N > 0 scores each target against N items
    drawn uniformly (shared by the batch, a draw equal to the target masked out).
    """
    real = (ids[:, :-1] > 0).any(0)  # columns with a real input in some window
    start = int(real.float().argmax()) if bool(real.any()) else ids.shape[1] - 2
    x, target = ids[:, start:-1], rows[:, start + 1:]
    trained = (x > 0) & (target >= 0)
    h = model(x)[trained]  # [P, D]
    target = target[trained]
    if negatives:
        drawn = torch.randint(len(catalogue_ids), (negatives,), generator=generator)
        pos = (h * model.items(catalogue_ids[target])).sum(-1, keepdim=True)  # [P, 1]
        neg = h @ model.items(catalogue_ids[drawn]).T  # [P, N]
        neg = neg.masked_fill(drawn[None, :] == target[:, None], float("-inf"))
        logits, target = torch.cat([pos, neg], 1), torch.zeros_like(target)
    else:
        logits = h @ model.items(catalogue_ids).T  # [P, I]
    loss = nn.functional.cross_entropy(logits, target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss, int(trained.sum())


def score(model: SASRec, catalogue_ids: torch.Tensor, split) -> dict:
    """Masked, unmasked and new-target metrics of one split (last position's state)."""
    model.eval()
    with torch.no_grad():
        hist = torch.from_numpy(np.array(split.user_inputs["user__history"], np.int64))
        users = torch.cat([model(hist[i:i + 2048])[:, -1] for i in range(0, len(hist), 2048)])
        items = model.items(catalogue_ids)  # [I, D]
    model.train()
    return retrieval_metrics(users, items, split.targets, split.history_offsets,
                             split.history_items)


def build(run: RunDir, s: Shape):
    """A run's reference model of shape ``s``, with what training it needs.

    Returns:
        ``(model, Adam, ids [N, L + 1], catalogue rows [N, L + 1], vocabulary id [I] of
        each catalogue row)``.
    """
    ids, rows = load_windows(run)
    catalogue_ids = torch.as_tensor(read_catalogue(run)["item__item_id"].astype(np.int64))
    model = SASRec(int(max(ids.max(), catalogue_ids.max())) + 1, ids.shape[1] - 1, s)
    return model, torch.optim.Adam(model.parameters(), lr=s.lr), ids, rows, catalogue_ids


def train(run_dir: Path, s: Shape, log=print, validate: bool = True) -> dict:
    """Train one shape; returns its best epoch's validation and test figures and speed.

    ``validate=False`` is the refit pass (the run's windows hold the validation targets):
    exactly ``s.epochs`` epochs, the last one scored on test, no validation figure.
    """
    torch.manual_seed(s.seed)
    run = RunDir(run_dir)
    model, opt, ids, rows, catalogue_ids = build(run, s)
    val = load_eval_set(run, "validation") if validate else None
    test = load_eval_set(run, "test")
    best, best_state, bad, samples, seconds = None, None, 0, 0, 0.0
    rng = np.random.default_rng(s.seed)
    draws = torch.Generator().manual_seed(s.seed)
    for epoch in range(1, s.epochs + 1):
        start = time.perf_counter()
        for b in np.array_split(rng.permutation(len(ids)), max(1, len(ids) // s.batch)):
            loss, trained = step(model, opt, ids[b], rows[b], catalogue_ids, s.negatives,
                                 draws)
            samples += trained
        seconds += time.perf_counter() - start
        if not validate:
            log(f"[sasrec] refit epoch {epoch} loss {float(loss.detach()):.4f} "
                f"({samples / seconds:,.0f} samples/s)")
            best = (epoch, None)  # the model as it stands is the one scored
            continue
        ndcg = score(model, catalogue_ids, val)["masked"]["NDCG@10"]
        log(f"[sasrec] epoch {epoch} loss {float(loss.detach()):.4f} val NDCG@10 {ndcg:.4f} "
            f"({samples / seconds:,.0f} samples/s)")
        if best is None or ndcg > best[1]:
            best, bad = (epoch, ndcg), 0
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= s.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"shape": asdict(s), "best_epoch": best[0], "epochs_run": epoch,
            "samples_per_s": samples / seconds, "train_s": seconds,
            "validation": score(model, catalogue_ids, val)["masked"] if validate else None,
            "test": score(model, catalogue_ids, test)}


def tune(run_dir: Path, grid: dict[str, list], log=print) -> dict:
    """Every shape of ``grid`` (Shape fields -> values); the best on validation NDCG@10."""
    keys = sorted(grid)
    tried = [train(run_dir, Shape(**dict(zip(keys, values, strict=True))), log)
             for values in itertools.product(*(grid[k] for k in keys))]
    best = max(tried, key=lambda r: r["validation"]["NDCG@10"])
    return {**best, "tried": [{"shape": r["shape"], "validation": r["validation"]}
                              for r in tried]}


def main(argv: list[str] | None = None) -> dict:
    """Train the reference on a prepared run and print its figures as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="A run directory with prepared/ (sequence mode).")
    for field, default in asdict(Shape()).items():
        p.add_argument(f"--{field}", type=type(default), nargs="+", default=[default])
    args = p.parse_args(argv)
    grid = {f: getattr(args, f) for f in asdict(Shape())}
    result = tune(args.run_dir, grid)
    print(json.dumps({k: result[k] for k in ("shape", "best_epoch", "samples_per_s",
                                              "validation")}, indent=1))
    print(json.dumps(result["test"]["masked"]))
    return result


if __name__ == "__main__":
    main()
