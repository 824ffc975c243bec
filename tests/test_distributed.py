"""Two gloo ranks on CPU: gathered candidates and DDP gradients equal one process on the batch.

One spawn (module fixture) runs every distributed check and writes its tensors to
``rank{r}.npz``; the tests compare them with a single-process computation on the full batch.
Convention proved (see ``towers/distributed.py``): each rank's loss is the mean over its
local rows against the globally gathered candidates; gather's backward sums over ranks;
DDP averages. Then DDP's gradients equal the single-process full-batch gradients, and a
rank's local-embedding gradient divided by the world size equals the full-batch slice.
"""

from __future__ import annotations

import datetime
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.config.loss import LossConfig
from training.distributed import gather_no_grad, gather_with_grad, world_info
from training.losses import retrieval_loss

WORLD = 2
LOCAL = 3  # rows per rank; the full batch is WORLD * LOCAL = 6
CFG = LossConfig(hard_negatives=3, label_smoothing=0.1)
TEMPERATURE = 0.5
IDS = torch.tensor([3, 5, 7, 3, 9, 5])  # rank 0 and rank 1 share items 3 and 5: cross-rank hits
UNEVEN = (3, 2)  # rows per rank for the uneven gather check
JOIN_TIMEOUT_S = 45.0  # bounds a hang; a normal run takes ~5-15 s


def _full_batch() -> dict[str, torch.Tensor]:
    """The global batch, identical on every process (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    return {"user_x": torch.randn(WORLD * LOCAL, 5, generator=g),
            "item_x": torch.randn(WORLD * LOCAL, 5, generator=g),
            "user_emb": torch.randn(WORLD * LOCAL, 4, generator=g),
            "item_emb": torch.randn(WORLD * LOCAL, 4, generator=g),
            "log_q": torch.randn(WORLD * LOCAL, generator=g) * 0.3}


class _Towers(nn.Module):
    """Two linear towers: enough to check parameter gradients through the gather."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.user = nn.Linear(5, 4)
        self.item = nn.Linear(5, 4)

    def forward(self, user_x, item_x):
        return self.user(user_x), self.item(item_x)


def _loss(user, items_global, ids_global, log_q_global, row_offset):
    positive = row_offset + torch.arange(len(user))
    return retrieval_loss(user, items_global, positive, ids_global, CFG, TEMPERATURE,
                          log_q_global)


def _worker(rank: int, out_dir: str) -> None:
    import faulthandler

    trace = open(os.path.join(out_dir, f"rank{rank}.trace"), "w")  # kept open until exit
    faulthandler.enable(file=trace, all_threads=True)  # a native abort leaves its stack here
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    batch, rows = _full_batch(), slice(rank * LOCAL, (rank + 1) * LOCAL)
    ids, log_q = gather_no_grad(IDS[rows]), gather_no_grad(batch["log_q"][rows])
    out = {"world": np.array(world_info()), "ids": ids.numpy(), "log_q": log_q.numpy()}

    # embeddings as leaves: each rank holds half the batch
    user = batch["user_emb"][rows].clone().requires_grad_(True)
    item = batch["item_emb"][rows].clone().requires_grad_(True)
    items = gather_with_grad(item)
    _loss(user, items, ids, log_q, rank * LOCAL).backward()
    out.update(items=items.detach().numpy(), user_grad=user.grad.numpy(),
               item_grad=item.grad.numpy())

    # parameters under real DDP (gradients averaged over ranks)
    model = nn.parallel.DistributedDataParallel(_Towers())
    u, v = model(batch["user_x"][rows], batch["item_x"][rows])
    _loss(u, gather_with_grad(v), ids, log_q, rank * LOCAL).backward()
    out.update({f"param.{k}": p.grad.numpy() for k, p in model.module.named_parameters()})

    # uneven local sizes: rank r holds UNEVEN[r] rows; loss = sum(gathered * (r + 1) * w)
    start = sum(UNEVEN[:rank])
    t = torch.arange(start, start + UNEVEN[rank], dtype=torch.float32).repeat(2, 1).T
    t.requires_grad_(True)  # [b_r, 2], row i of the global batch = [i, i]
    gathered = gather_with_grad(t)
    w = torch.arange(2 * sum(UNEVEN), dtype=torch.float32).reshape(-1, 2)
    (gathered * (rank + 1) * w).sum().backward()
    out.update(uneven=gathered.detach().numpy(), uneven_grad=t.grad.numpy())
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **out)
    dist.barrier()  # neither rank tears gloo down while the other still talks to it
    dist.destroy_process_group()


def _run_ranks(out_dir: Path) -> None:
    """Spawn the two ranks and wait, bounded by JOIN_TIMEOUT_S."""
    ctx = mp.start_processes(_worker, args=(str(out_dir),), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish in {JOIN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, np.ndarray]]:
    """Run the two-rank worker and load each rank's arrays.

    gloo occasionally aborts a rank natively on this machine ("terminate called without an
    active exception", about 1 run in 10 under pytest, never reproduced outside it); such
    a run is tried once more, and a second abort fails with both ranks' native stacks.
    """
    for attempt in range(2):
        out_dir = tmp_path_factory.mktemp("ddp")
        try:
            _run_ranks(out_dir)
            break
        except mp.ProcessExitedException as err:
            if attempt == 1:
                traces = "\n".join(p.read_text() for p in sorted(out_dir.glob("*.trace")))
                raise AssertionError(f"{err}\n{traces}") from None
            warnings.warn(f"gloo rank aborted, retrying once: {err}", stacklevel=1)
    return [dict(np.load(out_dir / f"rank{r}.npz", allow_pickle=False)) for r in range(WORLD)]


def test_world_info_and_identity_when_not_distributed():
    assert world_info() == (0, 1)
    t = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(t) is t and gather_no_grad(t) is t


def test_gather_concatenates_in_rank_order(ranks):
    batch = _full_batch()
    for r, out in enumerate(ranks):
        assert tuple(out["world"]) == (r, WORLD)
        assert np.array_equal(out["ids"], IDS.numpy())
        assert np.array_equal(out["log_q"], batch["log_q"].numpy())
        assert np.array_equal(out["items"], batch["item_emb"].numpy())


def test_embedding_gradients_over_world_equal_full_batch(ranks):
    # single process: L = mean over all 6 rows = (loss_0 + loss_1) / 2, so
    # dL/d(rank r's rows) = (rank r's local gradient, summed over ranks by gather) / WORLD
    batch = _full_batch()
    user = batch["user_emb"].clone().requires_grad_(True)
    item = batch["item_emb"].clone().requires_grad_(True)
    _loss(user, item, IDS, batch["log_q"], 0).backward()
    for r, out in enumerate(ranks):
        rows = slice(r * LOCAL, (r + 1) * LOCAL)
        assert np.allclose(out["user_grad"] / WORLD, user.grad[rows].numpy(), atol=1e-5)
        assert np.allclose(out["item_grad"] / WORLD, item.grad[rows].numpy(), atol=1e-5)
    assert item.grad.abs().sum() > 0


def test_ddp_parameter_gradients_equal_full_batch(ranks):
    batch = _full_batch()
    model = _Towers()
    u, v = model(batch["user_x"], batch["item_x"])
    _loss(u, v, IDS, batch["log_q"], 0).backward()
    for name, p in model.named_parameters():
        for out in ranks:  # DDP already averaged: every rank holds the same gradient
            assert np.allclose(out[f"param.{name}"], p.grad.numpy(), atol=1e-5), name


def test_uneven_sizes_gather_and_sum_gradients(ranks):
    # global rows i = 0..4 hold [i, i]; rank r's loss weights the gathered rows by (r + 1) * w
    # -> d/d(own rows) = sum over ranks (1 + 2) * w[own rows] = 3 * w[own rows]
    w = np.arange(2 * sum(UNEVEN), dtype=np.float32).reshape(-1, 2)
    starts = np.cumsum((0, *UNEVEN))
    for r, out in enumerate(ranks):
        assert np.array_equal(out["uneven"], np.repeat(np.arange(5.0), 2).reshape(5, 2))
        assert np.array_equal(out["uneven_grad"], 3 * w[starts[r] : starts[r + 1]])
