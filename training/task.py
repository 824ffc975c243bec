"""The training task: the retrieval loss around a two-tower model.

As torchrec's ``TwoTowerTrainTask``: the model returns embeddings; this module turns a
batch of prepared columns into a loss, with the in-batch candidates gathered from every
worker.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from pipeline.columns import ITEM, ITEM_INDEX, USER, tower_inputs
from pipeline.config.loss import LossConfig
from training.distributed import gather_no_grad, gather_with_grad, world_info
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
                extra: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Compute the tensors of one batch's loss.

        Returns:
            ``user`` [B, D], ``item`` [B, D], ``extra`` [M, D] (or None) embeddings, the
            scalar ``temperature`` and the scalar regulariser ``reg``.
        """
        out = {"user": self.model.encode_user(dict(user)),
               "item": self.model.encode_item(dict(item)),
               "temperature": self.model.temperature(),
               "reg": self.model.regularization_loss()}
        out["extra"] = self.model.encode_item(dict(extra)) if extra else None
        return out


class RetrievalTask:
    """Batch -> loss: in-batch (global) softmax with log-Q, masking and shared negatives.

    Args:
        cfg: the loss section.
        item_counts: [I] training interactions per item (log-Q, popularity sampling).
        catalogue: encoded catalogue columns ``item__*`` as tensors, [I, ...] each, used
            to embed sampled extra negatives.
        seed: negatives are sampled with ``seed + rank`` so workers draw different ones.
    """

    def __init__(self, cfg: LossConfig, item_counts: np.ndarray,
                 catalogue: Mapping[str, torch.Tensor], seed: int):
        rank, _ = world_info()
        self.cfg = cfg
        self.sampler = NegativeSampler(item_counts, cfg, seed=seed + rank)
        self.catalogue = dict(catalogue)

    def _extra_negatives(self, device) -> tuple[dict | None, torch.Tensor | None,
                                                torch.Tensor | None]:
        if not self.cfg.extra_negatives:
            return None, None, None
        ids, log_q = self.sampler.sample(self.cfg.extra_negatives)
        feats = {k: v[ids].to(device) for k, v in self.catalogue.items()}
        return tower_inputs(feats, ITEM), ids.to(device), log_q.to(device)

    def loss(self, module: nn.Module, batch: Mapping[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar training loss of one batch and its parts (as floats, for logging)."""
        device = batch[ITEM_INDEX].device
        extra, extra_ids, extra_log_q = self._extra_negatives(device)
        out = module(tower_inputs(batch, USER), tower_inputs(batch, ITEM), extra)
        rank, _ = world_info()
        candidates = gather_with_grad(out["item"])  # [W*B, D]: the global batch
        cand_ids = gather_no_grad(batch[ITEM_INDEX])  # [W*B]
        b = out["user"].shape[0]
        sizes = gather_no_grad(torch.tensor([b], device=device))  # [W] rows per rank
        positive = sizes[:rank].sum() + torch.arange(b, device=device)
        log_q = None
        if self.cfg.logq_correction:
            log_q = self.sampler.in_batch_log_q(cand_ids.cpu(), len(cand_ids)).to(device)
        if extra is not None:
            candidates = torch.cat([candidates, out["extra"]])
            cand_ids = torch.cat([cand_ids, extra_ids])
            if log_q is not None:
                log_q = torch.cat([log_q, extra_log_q])
        main = retrieval_loss(out["user"], candidates, positive, cand_ids, self.cfg,
                              out["temperature"], candidate_log_q=log_q)
        total = main + self.cfg.variational_dropout_weight * out["reg"]
        return total, {"loss": float(main.detach()), "reg": float(out["reg"].detach()),
                       "temperature": float(out["temperature"].detach())}
