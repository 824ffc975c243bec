"""Score masks of the retrieval losses: accidental hits, hard negatives, banned pairs.

Each returns a boolean ``[B, N]`` mask, or the scores with the masked pairs set to a
finite score far below any real one (``finfo.min / 100``: no weight in a softmax).
"""

from __future__ import annotations

import torch


def mask_value(dtype: torch.dtype) -> float:
    """The score a masked column gets: ``finfo(dtype).min / 100`` (TFRS ``MIN_FLOAT``).

    Finite, so softmax and BCE stay finite; far enough from ``finfo.min`` that subtracting
    a row maximum cannot overflow.
    """
    return torch.finfo(dtype).min / 100.0


def mask_scores(scores: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Replace dropped columns by :func:`mask_value`; their gradient is zero.

    Args:
        scores: [B, N] scores.
        drop: [B, N] bool, True where the column is masked.

    Returns:
        [B, N] scores.
    """
    return scores.masked_fill(drop, mask_value(scores.dtype))


def accidental_hit_mask(
    positive_ids: torch.Tensor, column_ids: torch.Tensor, positive_index: torch.Tensor
) -> torch.Tensor:
    """Columns holding the row's positive item anywhere but in the positive's own column.

    Args:
        positive_ids: [B] item id of each row's positive.
        column_ids: [N] item id of each column, or [B, N] when columns differ per row.
        positive_index: [B] column of each row's positive.

    Returns:
        [B, N] bool, True where the column is an accidental hit.
    """
    hits = column_ids == positive_ids[:, None]  # [B, N]
    rows = torch.arange(len(positive_index), device=hits.device)
    hits[rows, positive_index] = False
    return hits


def mask_accidental_hits(
    scores: torch.Tensor,
    positive_ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    positive_index: torch.Tensor,
) -> torch.Tensor:
    """Mask candidates that are the same item as the row's positive (TFRS ``RemoveAccidentalHits``).

    Args:
        scores: [B, N] logits.
        positive_ids: [B] item id of each row's positive.
        candidate_ids: [N] item id of each column (or [B, N]).
        positive_index: [B] column of each row's positive (never masked).

    Returns:
        [B, N] logits with accidental hits set to :func:`mask_value`.
    """
    return mask_scores(scores, accidental_hit_mask(positive_ids, candidate_ids, positive_index))


def hard_negative_mask(scores: torch.Tensor, positive_index: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each row's positive and its ``k`` highest-scoring other columns.

    ``k`` is clamped to ``N - 1``: a batch smaller than ``k + 1`` columns (the last one of
    an epoch) keeps every column rather than failing. Already-masked columns score
    :func:`mask_value`, so they are chosen last.

    Args:
        scores: [B, N] logits (not differentiated through: selection only).
        positive_index: [B] column of each row's positive.
        k: number of negatives kept per row, >= 1.

    Returns:
        [B, N] bool, True where the column is kept.
    """
    if k < 1:
        raise ValueError(f"hard negatives k={k} must be >= 1 (0 means no mining: skip the call)")
    rows = torch.arange(scores.shape[0], device=scores.device)
    others = scores.detach().clone()
    others[rows, positive_index] = float("-inf")
    top = others.topk(min(k, scores.shape[1] - 1), dim=1).indices  # [B, k]
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep.scatter_(1, top, True)
    keep[rows, positive_index] = True
    return keep
