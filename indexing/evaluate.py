"""Test and validation metrics, exact and through the index (EVALUATION.md's protocol).

Exact figures rank the whole catalogue by brute force; index figures rank what the index
returns for the user's top ``max(ks)``, by the same rule: the target's rank is the number
of returned items scoring strictly higher than it, exact scores both sides (a tie counts in
the target's favour). The target is reached when the index returns it or an item tying
it (the index broke the tie by row order); otherwise it counts as a miss. Masked figures
remove the user's history items, unmasked ones keep them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from indexing.batches import embed
from indexing.eval_set import EvalSet, load_eval_set, train_item_counts
from indexing.metrics import (
    DEFAULT_KS,
    check_finite,
    exact_scores,
    metrics_from_ranks,
    retrieval_metrics,
    target_scores,
)
from pipeline.columns import ITEM, USER
from pipeline.run_dir import RunDir, read_catalogue, trained_splits, write_json

if TYPE_CHECKING:  # faiss loads only where an index is used: training imports evaluate()
    from indexing.topk.base import TopK

MISS = 1 << 30  # the rank of a target the index did not return


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_set: EvalSet, catalogue: Mapping[str, np.ndarray],
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Exact masked and unmasked HR@10/50/100 and NDCG@10 of a model over the catalogue."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        items = embed(model.encode_item, catalogue, ITEM, device)
        users = embed(model.encode_user, eval_set.user_inputs, USER, device)
    finally:
        model.train(was_training)
    return retrieval_metrics(users, items, eval_set.targets, eval_set.history_offsets,
                             eval_set.history_items)


def popularity_metrics(counts: np.ndarray, eval_set: EvalSet) -> dict[str, float]:
    """Masked exact metrics of the most-popular baseline (EVALUATION.md's reference row).

    Every user ranks the catalogue by ``counts`` ([I] training interactions per item);
    a tie with the target counts in its favour, as for the model.
    """
    users = torch.ones(len(eval_set), 1)  # [U, 1]: the same ranking for everyone
    items = torch.as_tensor(counts, dtype=torch.float32)[:, None]  # [I, 1]
    return retrieval_metrics(users, items, eval_set.targets, eval_set.history_offsets,
                             eval_set.history_items)["masked"]


def index_ranks(index: TopK, user_emb: torch.Tensor, item_emb: torch.Tensor,
                eval_set: EvalSet, k: int, masked: bool) -> np.ndarray:
    """[U] 0-based rank of each target through the index (``MISS`` when not reached).

    The index returns its ``k`` best catalogue rows per user; they are re-scored exactly
    (:func:`~indexing.metrics.exact_scores`, the exact metrics' numbers). The rank is how
    many of them score strictly higher than the target, so ties go to the target as in
    the exact metrics. A target the index neither returns nor ties is a miss.

    Args:
        index: top-k over the catalogue; its ids are catalogue rows.
        user_emb: [U, D] user embeddings.
        item_emb: [I, D] catalogue embeddings (row = item_index).
        eval_set: targets and histories.
        k: results asked of the index.
        masked: remove each user's history items (never the target) first.
    """
    off, hist = eval_set.history_offsets, eval_set.history_items
    exclude = None
    if masked:
        exclude = [np.setdiff1d(hist[off[u]:off[u + 1]], [t])
                   for u, t in enumerate(eval_set.targets)]
    _, ids = index.search(user_emb.numpy(), k, exclude=exclude)  # [U, k], -1 padded
    targets = torch.as_tensor(eval_set.targets)
    ranks = np.empty(len(targets), np.int64)
    for rows, scores in exact_scores(user_emb, item_emb):  # [u, I]
        got = torch.as_tensor(ids[rows])  # [u, k]
        target = target_scores(scores, targets[rows])[:, None]  # [u, 1]
        returned = torch.where(got >= 0, scores.gather(1, got.clamp(min=0)),
                               torch.tensor(-torch.inf))  # [u, k]
        reached = (got == targets[rows, None]).any(1) | (returned == target).any(1)
        above = (returned > target).sum(1)
        ranks[rows] = torch.where(reached, above, MISS).numpy()
    return ranks


def index_metrics(index: TopK, user_emb: torch.Tensor, item_emb: torch.Tensor,
                  eval_set: EvalSet, ks=DEFAULT_KS) -> dict[str, dict[str, float]]:
    """Masked and unmasked HR@K / NDCG@10 through the index (embeddings as in ``index_ranks``)."""
    check_finite(user_emb, "user embeddings")
    check_finite(item_emb, "item embeddings")
    k = max(ks)
    return {name: metrics_from_ranks(torch.as_tensor(
        index_ranks(index, user_emb, item_emb, eval_set, k, masked)), ks)
        for name, masked in (("masked", True), ("unmasked", False))}


def split_metrics(user_emb: torch.Tensor, item_emb: torch.Tensor, index: TopK,
                  eval_set: EvalSet) -> dict[str, Any]:
    """``{"exact", "index", "unmasked": {"exact", "index"}, "new_targets", "users"}``.

    ``new_targets``: the exact masked figures over the users whose target is not already in
    their history, and their ``share`` (:func:`~indexing.metrics.retrieval_metrics`).

    Args:
        user_emb: [U, D] embeddings of the split's users (row = eval_set row).
        item_emb: [I, D] catalogue embeddings (row = item_index).
        index: the index over the same catalogue.
        eval_set: targets and histories of the split.
    """
    exact = retrieval_metrics(user_emb, item_emb, eval_set.targets, eval_set.history_offsets,
                              eval_set.history_items)
    through = index_metrics(index, user_emb, item_emb, eval_set)
    return {"exact": exact["masked"], "index": through["masked"],
            "unmasked": {"exact": exact["unmasked"], "index": through["unmasked"]},
            "new_targets": exact["new_targets"], "users": len(eval_set)}


def evaluate_run(run_dir: Path) -> dict[str, Any]:
    """All of ``metrics.json`` for a run directory with a model and an index.

    Test figures, and validation figures unless the model was refit on the validation
    targets (``trained_on`` names the splits it trained on).
    """
    from indexing.build import load_index, recall_at_k
    from indexing.topk.store import build_topk
    from towers.model import load_trained

    t0 = time.perf_counter()
    run = RunDir(run_dir)
    model, meta, _ = load_trained(run)
    similarity = meta.config.model.similarity
    index, manifest = load_index(run, meta)
    cpu = torch.device("cpu")
    items = embed(model.encode_item, read_catalogue(run), ITEM, cpu)  # once, [I, D]
    out: dict[str, Any] = {}
    users = {}
    counts = train_item_counts(run, len(items))
    # A refit model trained on the validation targets: only the test ones are left to score.
    refit = meta.config.train.refit
    for split in ("test",) if refit else ("test", "validation"):
        eval_set = load_eval_set(run, split)
        users[split] = embed(model.encode_user, eval_set.user_inputs, USER, cpu)
        out[split] = split_metrics(users[split], items, index, eval_set)
        out[split]["popularity"] = popularity_metrics(counts, eval_set)
    exact = build_topk(items.numpy(), np.arange(len(items), dtype=np.int64), similarity,
                       "exact", {})
    k = manifest.recall.k
    out["index_recall"] = {f"recall@{k}": recall_at_k(index, exact, users["test"].numpy(), k),
                           "users": len(users["test"]), "index_type": manifest.index.factory,
                           "sampled_users_recall": manifest.recall.value}
    out["trained_on"] = trained_splits(refit)
    out["model_version"] = meta.model_version
    out["seconds"] = round(time.perf_counter() - t0, 2)
    write_json(run.metrics, out)
    return out
