"""Full-catalogue exact retrieval metrics, as ``../shared/EVALUATION.md`` defines them.

For each user with one target item: the target's 0-based rank is the number of catalogue
items scoring strictly higher (a tie counts in the target's favour). "Masked" figures
remove the user's history items from the ranking first (the target itself is never
removed); "unmasked" keep them. HR@K = mean(rank < K); NDCG@10 = mean(1 / log2(rank + 2))
over targets ranked in the top 10.

Where a user's target is an item already in their history (re-consumption: none in
MovieLens, many in shopping or listening data), the masked ranking leaves that one history
item in and removes the others, so any model that scores history items above new ones ranks
such a target first. "New targets" are the masked figures over the other users alone (the
targets a model has to find among items the user never had).

Embeddings must be finite and a target's score a number: a NaN compares false with
everything, so it would rank first and count as a hit. Both are errors here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

DEFAULT_KS = (10, 50, 100)


def check_finite(x: torch.Tensor | np.ndarray, name: str) -> None:
    """Raise unless every value of an ``[N, D]`` embedding matrix is finite.

    Raises:
        ValueError: naming the matrix, how many rows hold NaN or infinity, and the first.
    """
    t = torch.as_tensor(x)
    if not t.numel():
        return
    bad = ~torch.isfinite(t).reshape(len(t), -1).all(dim=1)  # [N]
    if bad.any():
        first = int(torch.nonzero(bad)[0])
        raise ValueError(f"{name}: {int(bad.sum())} of {len(t)} rows hold NaN or infinite "
                         f"values (the first: row {first}); metrics need finite embeddings: "
                         "a diverged model (check the training loss, lower train.lr) or a "
                         "non-finite input feature")


def exact_scores(user_emb: torch.Tensor, item_emb: torch.Tensor, chunk: int = 1024
                 ) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(rows, [u, I] float32 scores)`` per chunk of users: the one exact scoring.

    Exact metrics and metrics through an index rank with these same numbers, so a tie in
    one is a tie in the other.
    """
    items = item_emb.float().T  # [D, I]
    for s in range(0, len(user_emb), chunk):
        rows = slice(s, min(s + chunk, len(user_emb)))
        yield rows, user_emb[rows].float() @ items


def target_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[U] score of each user's target in ``scores`` [U, I].

    Raises:
        ValueError: a target score is NaN (it would rank first: a false hit).
    """
    picked = scores.gather(1, targets[:, None])[:, 0]  # [U]
    nan = torch.isnan(picked)
    if nan.any():
        first = int(torch.nonzero(nan)[0])
        raise ValueError(f"the target score of {int(nan.sum())} of {len(picked)} users is NaN "
                         f"(the first: row {first}, target item {int(targets[first])}); a NaN "
                         "cannot be ranked (it would count as a hit): the embeddings overflow")
    return picked


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

    Raises:
        ValueError: a target score is NaN.
    """
    above = scores > target_scores(scores, targets)[:, None]
    if mask is not None:
        above &= ~mask
    return above.sum(dim=1)


def history_above(scores: torch.Tensor, targets: torch.Tensor, offsets: np.ndarray,
                  items: np.ndarray, rows: slice) -> torch.Tensor:
    """[u] distinct history items (the target excepted) scoring above each user's target.

    The unmasked rank minus this count is the masked rank: the rank among the items left
    once the history is removed (the target never is), computed over the histories alone
    instead of a [u, I] mask.

    Args:
        scores: [u, I] scores of users ``rows``.
        targets: [u] target item per user.
        offsets: [U + 1] CSR offsets into ``items`` (all users).
        items: [T] history items.
        rows: the users of ``scores``.
    """
    n_items = scores.shape[1]
    counts = np.diff(offsets[rows.start:rows.stop + 1])
    user = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    pairs = np.unique(user * n_items + items[offsets[rows.start]:offsets[rows.stop]])
    user, item = torch.from_numpy(pairs // n_items), torch.from_numpy(pairs % n_items)
    keep = item != targets[user]
    user, item = user[keep], item[keep]
    target = target_scores(scores, targets)
    above = scores[user, item] > target[user]
    return torch.bincount(user[above], minlength=len(counts))


def repeated_targets(targets: np.ndarray, history_offsets: np.ndarray,
                     history_items: np.ndarray) -> np.ndarray:
    """[U] bool: the user's target is one of their history items (CSR history)."""
    counts = np.diff(history_offsets)
    rows = np.repeat(np.arange(len(counts)), counts)
    items = history_items[history_offsets[0]:history_offsets[-1]]
    hit = items == np.asarray(targets)[rows]
    return np.bincount(rows[hit], minlength=len(counts)) > 0


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
        ``{"masked": {...}, "unmasked": {...}, "new_targets": {...}}`` with HR@K and
        NDCG@10; ``new_targets`` are the masked figures over the users whose target is
        not in their history, its ``share`` their fraction of all users (no figures when
        there are none).

    Raises:
        ValueError: an embedding is not finite, or a target score is NaN.
    """
    check_finite(user_emb, "user embeddings")
    check_finite(item_emb, "item embeddings")
    return metrics_of_scores(exact_scores(user_emb, item_emb, chunk), targets,
                             history_offsets, history_items, ks)


def metrics_of_scores(
    chunks: Iterable[tuple[slice, torch.Tensor]],
    targets: np.ndarray,
    history_offsets: np.ndarray,
    history_items: np.ndarray,
    ks=DEFAULT_KS,
) -> dict[str, dict[str, float]]:
    """:func:`retrieval_metrics` from score chunks already computed.

    For a model whose scores are not one dot product of two embedding tables (EASE: a
    sparse history times an item-item matrix). ``chunks`` yields ``(rows, [u, I] scores)``
    covering every user once, in order, as :func:`exact_scores` does.
    """
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    masked, unmasked = [], []
    with torch.no_grad():
        for rows, scores in chunks:  # [u, I]
            ranks = target_ranks(scores, t[rows])
            unmasked.append(ranks)
            masked.append(ranks - history_above(scores, t[rows], history_offsets,
                                                history_items, rows))
    masked_ranks = torch.cat(masked)
    new = torch.from_numpy(~repeated_targets(np.asarray(targets), history_offsets,
                                             history_items))
    return {"masked": metrics_from_ranks(masked_ranks, ks),
            "unmasked": metrics_from_ranks(torch.cat(unmasked), ks),
            "new_targets": {"share": float(new.double().mean()) if len(new) else 0.0,
                            **(metrics_from_ranks(masked_ranks[new], ks) if new.any()
                               else {})}}
