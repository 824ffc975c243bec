"""Full-catalogue exact evaluation of a two-tower model (EVALUATION.md's protocol)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from towers.metrics import retrieval_metrics
from training.data import ITEM, USER, EvalSet, iterate_batches, to_tensors, tower_inputs


@torch.no_grad()
def embed(encode: Callable[[dict], torch.Tensor], columns: Mapping[str, np.ndarray],
          tower: str, device: torch.device, batch_size: int = 4096) -> torch.Tensor:
    """Embed every row of ``columns`` (prefixed prepared columns) with one tower: [N, D]."""
    out = []
    for batch in iterate_batches(columns, batch_size):
        out.append(encode(tower_inputs(to_tensors(batch, device), tower)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def evaluate(model: torch.nn.Module, eval_set: EvalSet, catalogue: Mapping[str, np.ndarray],
             device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Masked and unmasked HR@10/50/100 and NDCG@10 of ``eval_set`` over the catalogue."""
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


def flat_metrics(metrics: dict[str, dict[str, float]], prefix: str) -> dict[str, float]:
    """``{"masked": {"HR@10": x}}`` -> ``{"val/HR@10": x, "val/unmasked/HR@10": ...}``."""
    out = {f"{prefix}/{k}": v for k, v in metrics["masked"].items()}
    out.update({f"{prefix}/unmasked/{k}": v for k, v in metrics["unmasked"].items()})
    return out
