"""Full-catalogue exact retrieval metrics, as ``../shared/EVALUATION.md`` defines them.

For each user with one target item: the target's 0-based rank is the number of catalogue
items scoring strictly higher (a tie counts in the target's favour). "Masked" figures
remove the user's history items from the ranking first (the target itself is never
removed); "unmasked" keep them. HR@K = mean(rank < K); NDCG@10 = mean(1 / log2(rank + 2))
over targets ranked in the top 10.
"""

from __future__ import annotations

import numpy as np
import torch

DEFAULT_KS = (10, 50, 100)


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of each target among the unmasked items.

    Args:
        scores: [U, I] user x item scores.
        targets: [U] target item index per user.
        mask: [U, I] bool, True where an item is removed from the ranking.

    Returns:
        [U] int64 ranks.
    """
    target_scores = scores.gather(1, targets[:, None])  # [U, 1]
    above = scores > target_scores
    if mask is not None:
        above &= ~mask
    return above.sum(dim=1)


def history_mask(
    offsets: np.ndarray, items: np.ndarray, rows: slice, n_items: int, targets: torch.Tensor
) -> torch.Tensor:
    """[U, I] bool mask of history items for users ``rows`` (CSR history), target kept."""
    start, stop = offsets[rows.start], offsets[rows.stop]
    counts = np.diff(offsets[rows.start : rows.stop + 1])
    r = np.repeat(np.arange(len(counts)), counts)
    mask = torch.zeros(len(counts), n_items, dtype=torch.bool)
    mask[torch.from_numpy(r), torch.from_numpy(items[start:stop].astype(np.int64))] = True
    mask[torch.arange(len(counts)), targets] = False
    return mask


def metrics_from_ranks(ranks: torch.Tensor, ks=DEFAULT_KS) -> dict[str, float]:
    """HR@K for each K and NDCG@10 from [U] ranks."""
    r = ranks.double()
    out = {f"HR@{k}": float((r < k).double().mean()) for k in ks}
    gains = torch.where(r < 10, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))
    out["NDCG@10"] = float(gains.mean())
    return out


def retrieval_metrics(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    targets: np.ndarray,
    history_offsets: np.ndarray,
    history_items: np.ndarray,
    ks=DEFAULT_KS,
    chunk: int = 1024,
) -> dict[str, dict[str, float]]:
    """Exact full-catalogue metrics, masked and unmasked.

    Args:
        user_emb: [U, D] user embeddings (already normalised for cosine similarity).
        item_emb: [I, D] catalogue embeddings, row = item index.
        targets: [U] target item index per user.
        history_offsets: [U + 1] CSR offsets into ``history_items``.
        history_items: [T] item indices of every user's history.
        ks: cut-offs for HR@K.
        chunk: users scored at once (memory is chunk x I floats).

    Returns:
        ``{"masked": {...}, "unmasked": {...}}`` with HR@K and NDCG@10.
    """
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    masked, unmasked = [], []
    with torch.no_grad():
        for s in range(0, len(t), chunk):
            rows = slice(s, min(s + chunk, len(t)))
            scores = user_emb[rows].float() @ item_emb.float().T  # [u, I]
            mask = history_mask(history_offsets, history_items, rows, len(item_emb), t[rows])
            masked.append(target_ranks(scores, t[rows], mask))
            unmasked.append(target_ranks(scores, t[rows]))
    return {"masked": metrics_from_ranks(torch.cat(masked), ks),
            "unmasked": metrics_from_ranks(torch.cat(unmasked), ks)}
