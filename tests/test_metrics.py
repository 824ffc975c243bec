"""Retrieval metrics: hand-worked ranks, ties, masking, and a numpy oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from indexing.metrics import metrics_from_ranks, retrieval_metrics, target_ranks


def test_hand_worked_ranks_ties_and_masking():
    # user 0: scores [0.9, 0.5, 0.5, 0.1], target 2 -> items above: 0 only (1 ties) -> rank 1
    # user 1: scores [0.2, 0.8, 0.3, 0.7], target 0 -> above: 1, 2, 3 -> rank 3;
    #         with history {1, 3} masked -> above: 2 -> rank 1
    scores = torch.tensor([[0.9, 0.5, 0.5, 0.1], [0.2, 0.8, 0.3, 0.7]])
    targets = torch.tensor([2, 0])
    assert target_ranks(scores, targets).tolist() == [1, 3]
    mask = torch.tensor([[False] * 4, [False, True, False, True]])
    assert target_ranks(scores, targets, mask).tolist() == [1, 1]


def test_metrics_from_ranks_hand_values():
    # ranks 0, 9, 10, 60: HR@10 = 2/4; HR@50 = 3/4; HR@100 = 1;
    # NDCG@10 = (1/log2(2) + 1/log2(11)) / 4 = (1 + 0.28906) / 4 = 0.322265
    m = metrics_from_ranks(torch.tensor([0, 9, 10, 60]))
    assert m["HR@10"] == 0.5 and m["HR@50"] == 0.75 and m["HR@100"] == 1.0
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(11)) / 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_retrieval_metrics_match_numpy_oracle(seed):
    rng = np.random.default_rng(seed)
    users, items, d = 37, 120, 8
    u, v = rng.normal(size=(users, d)), rng.normal(size=(items, d))
    targets = rng.integers(0, items, users)
    hist = [rng.choice(items, rng.integers(0, 15), replace=False) for _ in range(users)]
    for i in range(0, users, 4):  # a quarter of the targets are repeats of a history item
        if len(hist[i]):
            targets[i] = hist[i][-1]
    for i in range(1, users, 3):  # a history listing an item twice removes it once
        hist[i] = np.r_[hist[i], hist[i][:2]]
    offsets = np.r_[0, np.cumsum([len(h) for h in hist])]
    flat = np.concatenate(hist)
    got = retrieval_metrics(torch.tensor(u), torch.tensor(v), targets, offsets, flat, chunk=10)
    s = u @ v.T
    repeat = np.array([t in set(h) for t, h in zip(targets, hist, strict=True)])
    assert 5 <= repeat.sum() <= 15
    assert got["new_targets"]["share"] == pytest.approx(1 - repeat.mean())
    everyone = np.ones(users, bool)
    for kind, users_of in (("masked", everyone), ("unmasked", everyone),
                           ("new_targets", ~repeat)):
        ranks = []
        for i in np.flatnonzero(users_of):
            drop = set(hist[i]) - {targets[i]} if kind != "unmasked" else set()
            ranks.append(sum(1 for j in range(items)
                             if j not in drop and s[i, j] > s[i, targets[i]]))
        ranks = np.array(ranks)
        assert got[kind]["HR@10"] == pytest.approx(np.mean(ranks < 10))
        assert got[kind]["HR@50"] == pytest.approx(np.mean(ranks < 50))
        ndcg = np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0))
        assert got[kind]["NDCG@10"] == pytest.approx(ndcg)


def test_new_targets_hand_worked():
    # 3 users, 4 items; user 0's target (item 2) is in its history, users 1 and 2's are
    # not, so the new-target figures count users 1 and 2 alone.
    users = torch.eye(3, 4)
    items = torch.tensor([[4.0, 0, 0, 0], [0, 3, 0, 0], [0, 0, 2, 0], [0, 0, 0, 1]])
    # scores: u0 -> [4, 0, 0, 0], u1 -> [0, 3, 0, 0], u2 -> [0, 0, 2, 0]
    targets = np.array([2, 3, 2])
    offsets = np.array([0, 2, 3, 3])
    history = np.array([1, 2, 0])  # user 0: items 1, 2; user 1: item 0; user 2: none
    got = retrieval_metrics(users, items, targets, offsets, history)
    # masked ranks: u0 target 2 (score 0) below item 0 (4): rank 1; u1 target 3 (0) below
    # item 1 (3), item 0 removed: rank 1; u2 target 2 (2): rank 0
    assert got["masked"]["HR@10"] == 1.0
    assert got["masked"]["NDCG@10"] == pytest.approx((2 / math.log2(3) + 1) / 3)
    assert got["new_targets"]["share"] == pytest.approx(2 / 3)
    assert got["new_targets"]["NDCG@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    everyone_repeats = retrieval_metrics(users[:1], items, targets[:1], offsets[:2], history)
    assert everyone_repeats["new_targets"] == {"share": 0.0}


def test_most_popular_baseline_hand_worked():
    from indexing.eval_set import EvalSet
    from indexing.evaluate import popularity_metrics

    counts = np.arange(12, 0, -1).astype(float)  # item i was trained on 12 - i times
    # u0: target 1, history {0} masked -> nothing above it: rank 0
    # u1: target 11, no history -> 11 items above: rank 11 (a miss at 10, a hit at 50)
    # u2: target 5, history {0, 1, 9} -> above it: 2, 3, 4 -> rank 3
    users = EvalSet(user_inputs={}, targets=np.array([1, 11, 5]),
                    history_offsets=np.array([0, 1, 1, 4]),
                    history_items=np.array([0, 0, 1, 9]))
    got = popularity_metrics(counts, users)
    assert got["HR@10"] == pytest.approx(2 / 3) and got["HR@50"] == pytest.approx(1.0)
    assert got["NDCG@10"] == pytest.approx((1 + 0 + 1 / math.log2(5)) / 3)  # 0.476892
    # a tie with the target counts in its favour: every item equally popular -> rank 0
    assert popularity_metrics(np.ones(12), users)["HR@10"] == 1.0
