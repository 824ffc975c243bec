"""The training task: the retrieval loss around a two-tower model.

As torchrec's ``TwoTowerTrainTask``: the model returns embeddings; this module turns a
batch of prepared columns into a loss, with the in-batch candidates gathered from every
worker, each row's impressions (``loss.impressions_column``) as its own negatives, and each
row weighted by ``data.weight`` when set.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from pipeline.columns import IMPRESSIONS, ITEM, ITEM_INDEX, USER, WEIGHT, tower_inputs
from pipeline.config.loss import LossConfig
from training.distributed import (
    gather_no_grad,
    gather_with_grad,
    rank_sizes,
    sum_over_ranks,
    world_info,
)
from training.losses import retrieval_loss
from training.negatives import NegativeSampler


class TrainModule(nn.Module):
    """What DDP wraps: one forward computes every tensor the loss needs.

    DDP synchronises gradients of parameters used inside ``forward``, so both towers,
    the shared negatives, the temperature and the regulariser are all computed here.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, user: Mapping[str, torch.Tensor], item: Mapping[str, torch.Tensor],
                extra: Mapping[str, torch.Tensor] | None = None,
                row_items: Mapping[str, torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        """Compute the tensors of one batch's loss.

        Args:
            user: the user tower's inputs, [B, ...] each.
            item: the item tower's inputs of each row's positive, [B, ...] each.
            extra: item inputs of the shared sampled negatives, [M, ...] each, or None.
            row_items: item inputs of each row's impressions, flattened to [B * L, ...].

        Returns:
            ``user`` [B, D], ``item`` [B, D], ``extra`` [M, D] and ``row`` [B * L, D] (or
            None) embeddings, the scalar ``temperature`` and the scalar regulariser ``reg``.
        """
        out = {"user": self.model.encode_user(dict(user)),
               "item": self.model.encode_item(dict(item)),
               "temperature": self.model.temperature(),
               "reg": self.model.regularization_loss()}
        out["extra"] = self.model.encode_item(dict(extra)) if extra else None
        out["row"] = self.model.encode_item(dict(row_items)) if row_items else None
        return out


class RetrievalTask:
    """Batch -> loss: in-batch (global) softmax with log-Q, masking, shared and per-row negatives.

    Args:
        cfg: the loss section.
        item_counts: [I] training interactions per item (log-Q, popularity sampling).
        catalogue: encoded catalogue columns ``item__*`` as tensors, [I, ...] each, used
            to embed sampled extra negatives and each row's impressions.
        seed: negatives are sampled with ``seed + rank`` so workers draw different ones.
        weighted: weight each row's loss by its ``weight`` column (``data.weight`` is set).
    """

    def __init__(self, cfg: LossConfig, item_counts: np.ndarray,
                 catalogue: Mapping[str, torch.Tensor], seed: int, weighted: bool = False):
        rank, _ = world_info()
        self.cfg = cfg
        self.weighted = weighted
        self.sampler = NegativeSampler(item_counts, cfg, seed=seed + rank)
        self.catalogue = dict(catalogue)

    def _catalogue_rows(self, rows: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """Item-tower inputs of catalogue rows ``[K]`` (any device), on ``device``."""
        rows = rows.cpu()
        return tower_inputs({k: v[rows].to(device) for k, v in self.catalogue.items()}, ITEM)

    def _impressions(self, batch: Mapping[str, torch.Tensor]
                     ) -> tuple[dict | None, torch.Tensor | None]:
        """Item inputs of each row's impressions ([B * L, ...]) and their ids [B, L] (-1 = pad).

        Per row, never gathered across workers. Padding embeds catalogue row 0 (a safe
        index); the loss masks it by its id -1.
        """
        if self.cfg.impressions_column is None:
            return None, None
        if IMPRESSIONS not in batch:
            raise ValueError(f"loss.impressions_column={self.cfg.impressions_column!r} is set "
                             f"but the prepared rows have no {IMPRESSIONS!r} column; rerun "
                             "prepare with this config")
        ids = batch[IMPRESSIONS].long()  # [B, L]
        return self._catalogue_rows(ids.clamp(min=0).reshape(-1), ids.device), ids

    def extra_negatives(self, device) -> tuple[dict | None, torch.Tensor | None,
                                               torch.Tensor | None]:
        """Item inputs [M, ...], ids [M] and log-Q [M] of the batch's shared sampled negatives.

        (None, None, None) without ``loss.extra_negatives``. They are embedded inside the
        module's forward, so DDP sees the item tower used once per step.
        """
        if not self.cfg.extra_negatives:
            return None, None, None
        ids, log_q = self.sampler.sample(self.cfg.extra_negatives)
        return self._catalogue_rows(ids, device), ids.to(device), log_q.to(device)

    def _weights(self, batch: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Row weights [B] (``data.weight``) and their global normaliser, or (None, None)."""
        if not self.weighted:
            return None, None
        return global_normaliser(batch[WEIGHT].float())

    def candidates(self, item: torch.Tensor, item_ids: torch.Tensor,
                   extra: torch.Tensor | None = None, extra_ids: torch.Tensor | None = None,
                   extra_log_q: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The global candidate set: every rank's positives, then the shared sampled negatives.

        Args:
            item: [B, D] embeddings of this rank's positives (gathered with gradient).
            item_ids: [B] their catalogue rows.
            extra: [M, D] embeddings of the shared negatives (:meth:`extra_negatives`).
            extra_ids: [M] their catalogue rows.
            extra_log_q: [M] their log sampling probabilities.

        Returns:
            ``(candidates [N, D], candidate ids [N], positive column of each local row [B],
            log-Q [N] or None)`` with N = the global batch (+ ``loss.extra_negatives``).
        """
        device = item.device
        rank, _ = world_info()
        b = item.shape[0]
        sizes = rank_sizes(b, device)  # [W] rows per rank: one exchange for every gather
        candidates = gather_with_grad(item, sizes)  # [W*B, D]: the global batch
        cand_ids = gather_no_grad(item_ids, sizes)  # [W*B]
        positive = sum(sizes[:rank]) + torch.arange(b, device=device)
        log_q = None
        if self.cfg.logq_correction:
            log_q = self.sampler.in_batch_log_q(cand_ids.cpu(), len(cand_ids)).to(device)
        if extra is not None:
            candidates = torch.cat([candidates, extra])
            cand_ids = torch.cat([cand_ids, extra_ids])
            if log_q is not None:
                log_q = torch.cat([log_q, extra_log_q])
        return candidates, cand_ids, positive, log_q

    def loss(self, module: nn.Module, batch: Mapping[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of one batch and its parts (as floats, for logging)."""
        extra, extra_ids, extra_log_q = self.extra_negatives(batch[ITEM_INDEX].device)
        row_items, row_ids = self._impressions(batch)
        out = module(tower_inputs(batch, USER), tower_inputs(batch, ITEM), extra, row_items)
        candidates, cand_ids, positive, log_q = self.candidates(
            out["item"], batch[ITEM_INDEX], out["extra"], extra_ids, extra_log_q)
        row_neg = None if row_ids is None else out["row"].view(*row_ids.shape, -1)  # [B, L, D]
        weights, weight_total = self._weights(batch)
        main = retrieval_loss(out["user"], candidates, positive, cand_ids, self.cfg,
                              out["temperature"], candidate_log_q=log_q, row_negatives=row_neg,
                              row_negative_ids=row_ids, weights=weights,
                              weight_total=weight_total, num_items=self.sampler.num_items)
        total = main + self.cfg.variational_dropout_weight * out["reg"]
        return total, {"loss": float(main.detach()), "reg": float(out["reg"].detach()),
                       "temperature": float(out["temperature"].detach())}

    def samples(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Training examples in a batch: its interaction rows."""
        return len(batch[ITEM_INDEX])


def global_normaliser(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [B] and their normaliser: the global sum over the world size.

    DDP averages the per-rank losses, so ``sum_local w * l / (sum_global w / W)`` on
    every rank averages to ``sum_global w * l / sum_global w``, exactly the weighted
    mean over the global batch, also when local batches differ in size.
    """
    _, world = world_info()
    return weights, sum_over_ranks(weights.sum()) / world
