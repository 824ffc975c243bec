"""The retrieval task's wiring: impressions embedded as per-row negatives, rows weighted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.columns import IMPRESSIONS, ITEM_INDEX, WEIGHT
from pipeline.config.loss import LossConfig
from training.task import RetrievalTask, TrainModule

L1P1 = math.log1p(math.exp(-1.0))  # log(1 + e^-1) = 0.313262
ROW0 = math.log(2 + math.exp(-1.0))  # log(2 + e^-1) = 0.861995


class LookupTowers(nn.Module):
    """Embedding-table towers: user u -> USERS[u], item i -> ITEMS[i] (temperature 1)."""

    def __init__(self):
        super().__init__()
        self.users = nn.Parameter(torch.eye(2))
        # item 2 has item 0's embedding under another id: an impression, not a hit
        self.items = nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))

    def encode_user(self, x):
        return self.users[x["uid"]]

    def encode_item(self, x):
        return self.items[x["item_id"]]

    def temperature(self):
        return torch.tensor(1.0)

    def regularization_loss(self):
        return torch.tensor(0.0)


def make_task(weighted=False, impressions=True):
    cfg = LossConfig(logq_correction=False, variational_dropout_weight=0.0,
                     impressions_column="shown" if impressions else None)
    return RetrievalTask(cfg, np.ones(3), {"item__item_id": torch.arange(3)}, seed=0,
                         weighted=weighted)


def make_batch(weights=(1.0, 1.0)):
    """Users 0, 1 clicked items 0, 1; row 0 was shown item 2, row 1 its own item 1."""
    return {"user__uid": torch.tensor([0, 1]), "item__item_id": torch.tensor([0, 1]),
            ITEM_INDEX: torch.tensor([0, 1]), IMPRESSIONS: torch.tensor([[2, -1], [1, -1]]),
            WEIGHT: torch.tensor(weights)}


def task_loss(weights=None, impressions=True):
    task = make_task(weights is not None, impressions)
    module = TrainModule(LookupTowers())
    loss, _ = task.loss(module, make_batch() if weights is None else make_batch(weights))
    loss.backward()
    return loss.item(), module.model.items.grad


def test_impressions_become_each_rows_negatives():
    # users I, positives items 0, 1 (in-batch columns [1, 0] and [0, 1]).
    # row 0 was shown item 2 (embedding [1, 0]) -> columns [1, 0, 1, pad]:
    #   CE = log(e + 1 + e) - 1 = log(2 + e^-1) = 0.861995
    # row 1 was shown item 1, its own positive -> masked; its padding (-1) embeds row 0
    # (clamped) and is masked too -> columns [0, 1, hit, pad]: CE = log(1 + e^-1) = 0.313262
    # mean = (0.861995 + 0.313262) / 2 = 0.587628
    loss, grad = task_loss()
    assert loss == pytest.approx((ROW0 + L1P1) / 2, rel=1e-6)
    assert loss == pytest.approx(0.587628, abs=1e-6)
    assert grad[2].abs().sum() > 0  # the impression went through the item tower
    # without impressions both rows score [1, 0] / [0, 1]: log(1 + e^-1) each
    assert task_loss(impressions=False)[0] == pytest.approx(L1P1, rel=1e-6)
    assert task_loss(impressions=False)[1][2].abs().sum() == 0


def test_rows_weighted_by_the_weight_column():
    # weights [1, 3]: (1 * 0.861995 + 3 * 0.313262) / 4 = 1.801780 / 4 = 0.450445
    loss, _ = task_loss([1.0, 3.0])
    assert loss == pytest.approx((ROW0 + 3 * L1P1) / 4, rel=1e-6)
    assert loss == pytest.approx(0.450445, abs=1e-6)
    assert task_loss([1.0, 1.0])[0] == pytest.approx(task_loss()[0], rel=1e-6)


def test_missing_impressions_column_says_rerun_prepare():
    batch = make_batch()
    del batch[IMPRESSIONS]
    with pytest.raises(ValueError, match="rerun prepare"):
        make_task().loss(TrainModule(LookupTowers()), batch)
