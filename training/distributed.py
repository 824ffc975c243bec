"""Cross-rank candidates for the in-batch loss: gather with gradients, rank-agnostic losses.

Gradient convention (what makes DDP equal to one process on the global batch):

* Each rank computes ``loss_r`` = mean over its **local** query rows of the loss against the
  **globally gathered** candidates.
* The backward of :func:`gather_with_grad` gives each rank the **sum over all ranks** of the
  gradient w.r.t. its own slice (every rank's loss uses every rank's candidates).
* DDP then **averages** parameter gradients over the W ranks.

With equal local batches the single-process loss on the global batch is
``L = mean over all rows = (1 / W) * sum_r loss_r``, so ``dL/dtheta = (1 / W) * sum_r
dloss_r/dtheta`` is exactly DDP's average. Per rank: the gradient w.r.t. the local query
rows and local candidate rows, divided by W, equals the single-process gradient's slice.

Every gather takes the ranks' row counts (:func:`rank_sizes`); a caller that gathers
several tensors of one batch asks for them once and passes them on, so a training step
pays one size exchange, not one per gather (each collective is a synchronisation point,
where a rank waits for the slowest).

A custom autograd Function is used rather than ``torch.distributed.nn.functional.all_gather``
(deprecated in torch 2.13; its gloo backward needs all-to-all) so that one path works on
gloo and NCCL and local batches of unequal size (the last batch) can be gathered. The
backward is an all-reduce of the whole gathered gradient (then each rank keeps its slice):
W times the traffic of a reduce-scatter, negligible at [global B, D]. Every rank must run
the backward through the gather, as DDP training does, or the all-reduce waits forever.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_info() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_sizes(rows: int, device: torch.device | str = "cpu") -> list[int]:
    """``rows`` of every rank, in rank order (one all-gather; ``[rows]`` in one process).

    ``device``: where the collective's tensor lives (NCCL needs the rank's GPU).
    """
    if world_info()[1] == 1:
        return [rows]
    size = torch.tensor([rows], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _sizes_of(t: torch.Tensor, sizes: list[int] | None) -> list[int]:
    return rank_sizes(t.shape[0], t.device) if sizes is None else sizes


def _all_gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0; pads to the largest size for the collective.

    Args:
        t: [b_r, ...] this rank's tensor.
        sizes: [W] dim-0 size on each rank.

    Returns:
        [sum(sizes), ...] in rank order.
    """
    longest = max(sizes)
    padded = t.contiguous()
    if t.shape[0] < longest:
        padded = t.new_zeros((longest, *t.shape[1:]))
        padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    if all(n == longest for n in sizes):
        return torch.cat(parts, dim=0)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces (sums) the gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        ctx.start = sum(sizes[: dist.get_rank()])
        ctx.size = t.shape[0]
        return _all_gather_padded(t, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = grad.contiguous().clone()  # all_reduce is in place; the incoming grad is shared
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.start : ctx.start + ctx.size], None


def gather_with_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0, differentiable w.r.t. the local slice.

    Args:
        t: [b_r, ...] this rank's rows (sizes may differ between ranks).
        sizes: [W] every rank's b_r (:func:`rank_sizes`); asked for when None.

    Returns:
        [sum_r b_r, ...] in rank order; ``t`` itself when not distributed.
    """
    if world_info()[1] == 1:
        return t
    return _GatherWithGrad.apply(t, _sizes_of(t, sizes))


def gather_no_grad(t: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """All ranks' ``t`` (ids, log-Q) concatenated along dim 0, detached.

    Args:
        t: [b_r, ...] this rank's rows.
        sizes: [W] every rank's b_r (:func:`rank_sizes`); asked for when None.

    Returns:
        [sum_r b_r, ...] in rank order; ``t`` itself when not distributed.
    """
    if world_info()[1] == 1:
        return t
    with torch.no_grad():
        return _all_gather_padded(t, _sizes_of(t, sizes))


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``t`` over all ranks, detached (``t`` in one process)."""
    if world_info()[1] == 1:
        return t
    total = t.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def epoch_stats_over_ranks(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    """One epoch's figures for the whole worker group, identical on every rank.

    ``loss`` is the mean over every rank's steps, ``rows`` the sum over ranks, ``seconds``
    the slowest rank's (DDP steps in lock-step) and ``samples_per_s`` all rows over those
    seconds. ``steps`` (optimizer steps, the same on every rank) and ``lr`` stay as they
    are. One process: unchanged.

    Args:
        stats: this rank's ``loss``, ``rows``, ``steps``, ``seconds`` (and ``lr``).
        device: where the collective's tensors live (the training device: NCCL needs CUDA).
    """
    if world_info()[1] == 1:
        return dict(stats)
    sums = torch.tensor([stats["loss"] * stats["steps"], stats["rows"], stats["steps"]],
                        dtype=torch.float64, device=device)
    slowest = torch.tensor([stats["seconds"]], dtype=torch.float64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    loss_sum, rows, all_steps = sums.tolist()
    seconds = float(slowest.item())
    return {**stats, "loss": loss_sum / all_steps, "rows": int(rows), "seconds": seconds,
            "samples_per_s": rows / seconds}
