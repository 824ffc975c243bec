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


def _local_sizes(t: torch.Tensor) -> list[int]:
    """Dim-0 size of ``t`` on every rank, in rank order."""
    size = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def _all_gather_padded(t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's ``t`` along dim 0; pads to the largest size for the collective.

    Args:
        t: [b_r, ...] this rank's tensor.
        sizes: [W] dim-0 size on each rank.

    Returns:
        [sum(sizes), ...] in rank order.
    """
    longest = max(sizes)
    padded = t.new_zeros((longest, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all-reduces (sums) the gradient and keeps this rank's rows."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        sizes = _local_sizes(t)
        ctx.start = sum(sizes[: dist.get_rank()])
        ctx.size = t.shape[0]
        return _all_gather_padded(t, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.contiguous().clone()  # all_reduce is in place; the incoming grad is shared
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total[ctx.start : ctx.start + ctx.size]


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0, differentiable w.r.t. the local slice.

    Args:
        t: [b_r, ...] this rank's rows (sizes may differ between ranks).

    Returns:
        [sum_r b_r, ...] in rank order; ``t`` itself when not distributed.
    """
    if world_info()[1] == 1:
        return t
    return _GatherWithGrad.apply(t)


def gather_no_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` (ids, log-Q) concatenated along dim 0, detached.

    Args:
        t: [b_r, ...] this rank's rows.

    Returns:
        [sum_r b_r, ...] in rank order; ``t`` itself when not distributed.
    """
    if world_info()[1] == 1:
        return t
    with torch.no_grad():
        return _all_gather_padded(t, _local_sizes(t))
