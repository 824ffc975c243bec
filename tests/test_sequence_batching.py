"""Batching windows: length-sorted pools, and the settings resolved from the data (auto)."""

from __future__ import annotations

import numpy as np


def test_bucketed_order_is_a_permutation_of_similar_length_batches():
    from training.data import bucketed_order

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, 1000)
    order = bucketed_order(lengths, 16, seed=3, epoch=1, pool_batches=8).numpy()
    assert sorted(order.tolist()) == list(range(1000))
    assert (order == bucketed_order(lengths, 16, 3, 1, 8).numpy()).all()  # (seed, epoch) alone
    assert not (order == bucketed_order(lengths, 16, 3, 2, 8).numpy()).all()
    spread = [np.ptp(lengths[order[i:i + 16]]) for i in range(0, 992, 16)]
    plain = [np.ptp(lengths[rng.permutation(1000)[:16]]) for _ in range(62)]
    assert np.mean(spread) < np.mean(plain) / 4  # a batch's windows need similar lengths


def test_auto_length_pools_follow_the_median_history():
    from training.data import uses_length_pools

    amazon, movielens = uses_length_pools("auto", 6, 50), uses_length_pools("auto", 65, 100)
    assert amazon == (True, "sequence.length_pools: auto -> on (median history 6 < 0.25 x "
                            "max_length 50)")
    assert movielens[0] is False and ">= 0.25 x max_length 100" in movielens[1]
    assert uses_length_pools("auto", None, 50)[0] is False  # a run prepared before the stat
    assert uses_length_pools(True, 65, 100)[0] is True


def test_auto_candidates_score_small_catalogues_in_full():
    from pipeline.config.sequence import SequenceConfig
    from training.sequence import scores_full_catalogue

    cfg = SequenceConfig(objective="clm")  # candidates: auto
    assert scores_full_catalogue(cfg, 1_682) and scores_full_catalogue(cfg, 4_096)
    assert not scores_full_catalogue(cfg, 18_357)  # sampled: cheaper from ~3,000-4,000 items
