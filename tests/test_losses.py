"""Retrieval loss pieces: hand-worked 2x2 / 3x3 examples, and the composition vs a loop oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config.loss import LossConfig
from training.losses import (
    apply_temperature,
    gbce_beta,
    generalized_bce,
    logq_correction,
    pointwise_bce,
    retrieval_loss,
    softmax_cross_entropy,
    weighted_mean,
)
from training.masks import accidental_hit_mask, hard_negative_mask, mask_accidental_hits, mask_value
from training.negatives import NegativeSampler

L1P = math.log1p(math.exp(-2.0))  # log(1 + e^-2) = 0.126928


def test_temperature_divides():
    # [[1, 2], [3, 4]] / 0.5 = [[2, 4], [6, 8]]
    got = apply_temperature(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), 0.5)
    assert got.tolist() == [[2.0, 4.0], [6.0, 8.0]]
    with pytest.raises(ValueError, match="temperature 0 must be > 0"):
        apply_temperature(torch.zeros(1, 1), 0)


def test_logq_subtracts_per_column():
    # log_q = [log 0.5, log 0.25]: row 0 -> [1 + 0.6931, 2 + 1.3863] = [1.6931, 3.3863]
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    got = logq_correction(scores, torch.tensor([math.log(0.5), math.log(0.25)]))
    want = [[1 + math.log(2), 2 + math.log(4)], [3 + math.log(2), 4 + math.log(4)]]
    assert torch.allclose(got, torch.tensor(want))
    with pytest.raises(ValueError, match=r"expected \[2\]"):
        logq_correction(scores, torch.zeros(3))


def test_accidental_hits_duplicate_item_in_batch():
    # in-batch: rows' positives are items [7, 8, 7] in columns [0, 1, 2]. Row 0's positive 7
    # is also column 2 -> masked; row 2's positive 7 is also column 0 -> masked; row 1 clean.
    ids = torch.tensor([7, 8, 7])
    pos = torch.tensor([0, 1, 2])
    hits = accidental_hit_mask(ids, ids, pos)
    assert hits.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    scores = torch.ones(3, 3)
    got = mask_accidental_hits(scores, ids, ids, pos)
    assert got[0, 2] == got[2, 0] == mask_value(torch.float32)
    assert torch.isfinite(got).all() and got[~hits].eq(1.0).all()


def test_hard_negatives_keep_positive_and_top_k():
    # row 0: positive col 0 (score 5); negatives 1, 3, 2 -> top-1 is col 2 (3)
    # row 1: positive col 1 (score 4, lower than col 2's 9); top-1 negative is col 2
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, 9.0, 1.0]])
    keep = hard_negative_mask(scores, torch.tensor([0, 1]), 1)
    assert keep.tolist() == [[True, False, True, False], [False, True, True, False]]
    # k larger than the 3 available negatives keeps every column (clamped, documented)
    assert hard_negative_mask(scores, torch.tensor([0, 1]), 10).all()


def test_softmax_ce_and_label_smoothing_over_unmasked_columns():
    # logits [2, 0], positive 0: p0 = e^2 / (e^2 + 1) -> CE = log(1 + e^-2) = 0.126928
    logits = torch.tensor([[2.0, 0.0]])
    pos = torch.tensor([0])
    assert softmax_cross_entropy(logits, pos).item() == pytest.approx(L1P, rel=1e-6)
    # smoothing 0.2 over 2 columns: target [0.9, 0.1]; log p = [-0.126928, -2.126928]
    # CE = 0.9 * 0.126928 + 0.1 * 2.126928 = 0.114235 + 0.212693 = 0.326928
    smoothed = softmax_cross_entropy(logits, pos, 0.2)
    assert smoothed.item() == pytest.approx(0.9 * L1P + 0.1 * (2 + L1P), rel=1e-6)
    assert smoothed.item() == pytest.approx(F.cross_entropy(logits, pos, label_smoothing=0.2))
    # a third, masked column changes nothing: it gets neither probability nor target mass
    masked = torch.tensor([[2.0, 0.0, mask_value(torch.float32)]])
    valid = torch.tensor([[True, True, False]])
    assert softmax_cross_entropy(masked, pos, 0.2, valid).item() == pytest.approx(smoothed.item())


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_softmax_ce_equals_log_softmax_reference(smoothing, masked):
    # the fused forward/backward against autograd through log_softmax (the textbook form):
    # same per-row losses and the same gradient, zero at dropped columns
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(7, 11, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    pos = torch.randint(0, 11, (7,), generator=gen)
    valid = torch.rand(7, 11, generator=gen) > 0.4 if masked else torch.ones(7, 11, dtype=bool)
    valid[torch.arange(7), pos] = True
    row_w = torch.rand(7, generator=gen, dtype=torch.float64)
    got = softmax_cross_entropy(logits, pos, smoothing, valid if masked else None)
    (got * row_w).sum().backward()
    got_grad, logits.grad = logits.grad.clone(), None
    log_p = F.log_softmax(logits.masked_fill(~valid, mask_value(torch.float64)), dim=1)
    want = -(1 - smoothing) * log_p.gather(1, pos[:, None])[:, 0] \
        - smoothing * (log_p * valid).sum(1) / valid.sum(1)
    (want * row_w).sum().backward()
    torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, logits.grad, rtol=1e-12, atol=1e-12)
    assert got_grad[~valid].eq(0).all() and logits.grad[valid].ne(0).all()
    assert masked == bool((~valid).any())  # the masked case drops some columns


def test_pointwise_bce_mean_over_valid_columns():
    # logits [2, 0], positive 0: BCE = [log(1 + e^-2), log(1 + e^0)] = [0.126928, 0.693147]
    # mean = 0.410038; a masked third column is left out of the mean
    logits = torch.tensor([[2.0, 0.0, mask_value(torch.float32)]])
    valid = torch.tensor([[True, True, False]])
    got = pointwise_bce(logits, torch.tensor([0]), valid)
    assert got.item() == pytest.approx((L1P + math.log(2)) / 2, rel=1e-6)
    assert pointwise_bce(logits[:, :2], torch.tensor([0])).item() == pytest.approx(got.item())


def test_composed_loss_hand_worked():
    # q = [1, 0], [0, 1]; candidates = I (in-batch) + [1, 1] (sampled extra, id 9)
    # scores = [[1, 0, 1], [0, 1, 1]]; t = 0.5 -> [[2, 0, 2], [0, 2, 2]]
    # log_q = [0, 0, log 2] -> [[2, 0, 2 - 0.6931], [0, 2, 2 - 0.6931]]
    # row 0 CE = log(e^2 + 1 + e^2 / 2) - 2 = log(1.5 + e^-2) = 0.491546; row 1 the same
    q = torch.eye(2)
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cfg = LossConfig(mask_accidental_hits=False)
    log_q = torch.tensor([0.0, 0.0, math.log(2)])
    got = retrieval_loss(q, cand, torch.tensor([0, 1]), torch.tensor([3, 4, 9]), cfg, 0.5, log_q)
    assert got.item() == pytest.approx(math.log(1.5 + math.exp(-2)), rel=1e-6)
    # the extra negative is item 3 (row 0's positive): masked for row 0 only
    # row 0 CE = log(1 + e^-2) = 0.126928; mean = (0.126928 + 0.491546) / 2 = 0.309237
    cfg = LossConfig(mask_accidental_hits=True)
    got = retrieval_loss(q, cand, torch.tensor([0, 1]), torch.tensor([3, 4, 3]), cfg, 0.5, log_q)
    assert got.item() == pytest.approx((L1P + math.log(1.5 + math.exp(-2))) / 2, rel=1e-6)


def test_banned_columns_leave_the_softmax():
    # scores / 0.5 = [[2, 0, 2], [0, 2, 2]]; row 0 bans column 2, row 1 bans nothing:
    # row 0 CE = log(e^2 + 1) - 2 = log(1 + e^-2); row 1 = log(1 + 2 e^-2)... as unbanned
    q = torch.eye(2)
    cand = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cfg = LossConfig(mask_accidental_hits=False, logq_correction=False)
    banned = torch.tensor([[False, False, True], [False, False, False]])
    got = retrieval_loss(q, cand, torch.tensor([0, 1]), torch.tensor([3, 4, 9]), cfg, 0.5,
                         banned=banned)
    row1 = math.log(math.exp(0) + math.exp(2) + math.exp(2)) - 2
    assert got.item() == pytest.approx((L1P + row1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match=r"banned \(2, 2\) must be \[B, N\]"):
        retrieval_loss(q, cand, torch.tensor([0, 1]), torch.tensor([3, 4, 9]), cfg, 0.5,
                       banned=banned[:, :2])


L1P1 = math.log1p(math.exp(-1.0))  # log(1 + e^-1) = 0.313262
Q2 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # with candidates I: scores [[2, 0], [0, 1]]
PLAIN = {"logq_correction": False, "mask_accidental_hits": False}


def _two_rows(weights=None, **cfg):
    cfg = LossConfig(**{**PLAIN, **cfg})
    return retrieval_loss(Q2, torch.eye(2), torch.tensor([0, 1]), torch.tensor([3, 4]), cfg,
                          1.0, weights=weights).item()


def test_weighted_softmax_hand_worked():
    # scores [[2, 0], [0, 1]], t = 1: row 0 CE = log(1 + e^-2) = 0.126928,
    # row 1 CE = log(1 + e^-1) = 0.313262; plain mean = 0.220095
    # weights [3, 1]: (3 * 0.126928 + 1 * 0.313262) / (3 + 1) = 0.694046 / 4 = 0.173511
    assert _two_rows() == pytest.approx((L1P + L1P1) / 2, rel=1e-6)
    assert _two_rows(torch.tensor([3.0, 1.0])) == pytest.approx((3 * L1P + L1P1) / 4, rel=1e-6)
    assert _two_rows(torch.tensor([3.0, 1.0])) == pytest.approx(0.173511, abs=1e-6)


def test_weighted_bce_hand_worked():
    # row 0 logits [2, 0], label col 0: BCE [log(1 + e^-2), log 2] -> mean 0.410038
    # row 1 logits [0, 1], label col 1: BCE [log 2, log(1 + e^-1)] -> mean 0.503204
    # weights [3, 1]: (3 * 0.410038 + 0.503204) / 4 = 1.733317 / 4 = 0.433329
    row0, row1 = (L1P + math.log(2)) / 2, (math.log(2) + L1P1) / 2
    assert _two_rows(kind="bce") == pytest.approx((row0 + row1) / 2, rel=1e-6)
    got = _two_rows(torch.tensor([3.0, 1.0]), kind="bce")
    assert got == pytest.approx((3 * row0 + row1) / 4, rel=1e-6)
    assert got == pytest.approx(0.433329, abs=1e-6)


@pytest.mark.parametrize("kind", ["softmax", "bce"])
def test_all_ones_weights_equal_the_unweighted_loss(kind):
    q, cand, pos, ids, _, row_neg, row_ids = _random_batch(2)
    cfg = LossConfig(kind=kind, logq_correction=False, impressions_column="imp")
    plain = retrieval_loss(q, cand, pos, ids, cfg, 0.7, None, row_neg, row_ids)
    ones = retrieval_loss(q, cand, pos, ids, cfg, 0.7, None, row_neg, row_ids,
                          weights=torch.ones(len(q)))
    assert ones.item() == pytest.approx(plain.item(), rel=1e-6)


def test_weighted_mean_normaliser_and_zero_weights():
    losses = torch.tensor([1.0, 4.0])
    # (1 * 1 + 3 * 4) / 4 = 3.25; with a DDP normaliser of 2 (global sum / W): 13 / 2 = 6.5
    assert weighted_mean(losses, torch.tensor([1.0, 3.0])).item() == pytest.approx(3.25)
    assert weighted_mean(losses, torch.tensor([1.0, 3.0]), 2.0).item() == pytest.approx(6.5)
    assert weighted_mean(losses, torch.zeros(2)).item() == 0.0  # not NaN
    assert weighted_mean(losses).item() == pytest.approx(2.5)
    with pytest.raises(ValueError, match=r"must be \[2\], one per row"):
        weighted_mean(losses, torch.ones(3))


def test_impression_is_only_its_own_rows_extra_negative():
    # q = I, candidates = I (items 3, 4), t = 1, masking on, no log-Q.
    # row 0's impression is item 7 with embedding [1, 0]; row 1's is item 4 (its own
    # positive: an accidental hit) with embedding [0, 5]; second slots are padding (-1).
    # score columns [in-batch 3, in-batch 4, impression slot 0, slot 1]:
    #   row 0: [1, 0, 1, pad]        -> CE = log(e + 1 + e) - 1 = log(2 + e^-1) = 0.861995
    #   row 1: [0, 1, hit 5, pad]    -> CE = log(1 + e^-1) = 0.313262
    # mean = (0.861995 + 0.313262) / 2 = 0.587628. Item 7 is not a column of row 1: shared,
    # it would add e^0 to row 1's denominator.
    row_neg = torch.tensor([[[1.0, 0.0], [9.0, 9.0]], [[0.0, 5.0], [9.0, 9.0]]])  # [2, 2, 2]
    row_ids = torch.tensor([[7, -1], [4, -1]])
    cfg = LossConfig(logq_correction=False, impressions_column="imp")
    got = retrieval_loss(torch.eye(2), torch.eye(2), torch.tensor([0, 1]), torch.tensor([3, 4]),
                         cfg, 1.0, None, row_neg, row_ids)
    assert got.item() == pytest.approx((math.log(2 + math.exp(-1)) + L1P1) / 2, rel=1e-6)
    assert got.item() == pytest.approx(0.587628, abs=1e-6)


def _oracle(q, cand, pos, cand_ids, cfg, t, log_q, row_neg, row_ids):
    """The loss computed row by row in float64 numpy, straight from the definitions."""
    q, cand = q.double().numpy(), cand.double().numpy()
    losses = []
    for b in range(len(q)):
        cols = [(q[b] @ cand[j] / t - (log_q[j].item() if log_q is not None else 0.0),
                 int(cand_ids[j]), j == pos[b]) for j in range(len(cand))]
        if row_neg is not None:
            cols += [(q[b] @ row_neg[b, m].double().numpy() / t, int(row_ids[b, m]), False)
                     for m in range(row_ids.shape[1]) if row_ids[b, m] >= 0]
        pos_id = int(cand_ids[pos[b]])
        if cfg.mask_accidental_hits:
            cols = [c for c in cols if c[2] or c[1] != pos_id]
        if cfg.hard_negatives:
            negs = sorted((c for c in cols if not c[2]), key=lambda c: -c[0])
            cols = [c for c in cols if c[2]] + negs[: cfg.hard_negatives]
        logits = np.array([c[0] for c in cols])
        labels = np.array([float(c[2]) for c in cols])
        if cfg.kind.value == "bce":
            losses.append(np.mean(np.logaddexp(0, logits) - labels * logits))
        else:
            log_p = logits - np.logaddexp.reduce(logits)
            eps = cfg.label_smoothing
            target = (1 - eps) * labels + eps / len(cols)
            losses.append(-(target * log_p).sum())
    return float(np.mean(losses))


def _random_batch(seed, b=5, n_extra=3, m=4, d=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g)
    cand = torch.randn(b + n_extra, d, generator=g)
    ids = torch.tensor([10, 11, 10, 12, 13, 11, 20, 10])[: b + n_extra]  # duplicates: hits
    row_neg = torch.randn(b, m, d, generator=g)
    row_ids = torch.randint(10, 22, (b, m), generator=g)
    row_ids[0, -1] = -1  # padding
    row_ids[1, 0] = ids[1]  # an impression that is the row's own positive
    log_q = torch.randn(b + n_extra, generator=g) * 0.5
    return q, cand, torch.arange(b), ids, log_q, row_neg, row_ids


CONFIGS = [
    LossConfig(logq_correction=False, mask_accidental_hits=False),
    LossConfig(impressions_column="imp"),
    LossConfig(impressions_column="imp", hard_negatives=3, label_smoothing=0.1),
    LossConfig(kind="bce", logq_correction=False, impressions_column="imp", hard_negatives=2),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cfg", CONFIGS, ids=["plain", "logq+imp", "hard+smooth", "bce"])
def test_composed_loss_matches_loop_oracle(cfg, seed):
    q, cand, pos, ids, log_q, row_neg, row_ids = _random_batch(seed)
    log_q = log_q if cfg.logq_correction else None
    imp = cfg.impressions_column is not None
    args = (row_neg, row_ids) if imp else (None, None)
    got = retrieval_loss(q, cand, pos, ids, cfg, 0.7, log_q, *args)
    assert got.item() == pytest.approx(_oracle(q, cand, pos, ids, cfg, 0.7, log_q, *args),
                                       rel=1e-5)


def test_gradients_finite_and_zero_on_masked_columns():
    # candidate 5 duplicates row 0's positive id (masked for row 0 only); candidate 6 has
    # log_q = 100, so its logit is ~100 below every other column in every row: never among
    # the top-2 hard negatives, masked everywhere, no gradient at all
    q, cand, pos, ids, log_q, _, _ = _random_batch(3, n_extra=2)
    log_q[6] = 100.0
    ids = torch.tensor([10, 11, 12, 13, 14, 10, 15])
    q.requires_grad_(True)
    cand.requires_grad_(True)
    temperature = torch.tensor(0.3, requires_grad=True)
    cfg = LossConfig(hard_negatives=2, label_smoothing=0.1)
    loss = retrieval_loss(q, cand, pos, ids, cfg, temperature, log_q)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and torch.isfinite(cand.grad).all()
    assert torch.isfinite(temperature.grad) and temperature.grad != 0
    assert cand.grad[6].abs().max() == 0.0 and cand.grad[:6].abs().sum() > 0


def test_masked_score_columns_get_zero_gradient():
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.1, 0.2], [2.0, 1.0, 0.0]], requires_grad=True)
    ids, pos = torch.tensor([7, 8, 7]), torch.tensor([0, 1, 2])
    masked = mask_accidental_hits(scores, ids, ids, pos)
    hits = accidental_hit_mask(ids, ids, pos)
    softmax_cross_entropy(masked, pos, 0.1, ~hits).sum().backward()
    assert scores.grad[hits].eq(0).all() and scores.grad[~hits].ne(0).all()


def test_all_negatives_masked_stays_finite():
    # a one-item batch whose only other column is the same item: loss = -log(1) = 0
    q = torch.ones(2, 3)
    loss = retrieval_loss(q, q, torch.tensor([0, 1]), torch.tensor([5, 5]),
                          LossConfig(logq_correction=False, label_smoothing=0.2), 0.1)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_invalid_combinations_say_why():
    q, cand, pos, ids, log_q, row_neg, row_ids = _random_batch(0)
    with pytest.raises(ValueError, match="logq_correction=true needs candidate_log_q"):
        retrieval_loss(q, cand, pos, ids, LossConfig(), 1.0)
    with pytest.raises(ValueError, match="logq_correction=false would ignore it"):
        retrieval_loss(q, cand, pos, ids, LossConfig(logq_correction=False), 1.0, log_q)
    cfg = LossConfig(logq_correction=False, impressions_column="imp")
    with pytest.raises(ValueError, match="go together"):
        retrieval_loss(q, cand, pos, ids, cfg, 1.0, row_negatives=row_neg)
    with pytest.raises(ValueError, match="impressions_column is not set"):
        retrieval_loss(q, cand, pos, ids, LossConfig(logq_correction=False), 1.0, None,
                       row_neg, row_ids)
    with pytest.raises(ValueError, match=r"must be \[5, M, 6\]"):
        retrieval_loss(q, cand, pos, ids, cfg, 1.0, None, row_neg[:, :, :2], row_ids)
    with pytest.raises(ValueError, match="same D"):
        retrieval_loss(q, cand[:, :3], pos, ids, cfg, 1.0)
    with pytest.raises(ValueError, match="temperature -1"):
        retrieval_loss(q, cand, pos, ids, LossConfig(logq_correction=False), -1.0)
    with pytest.raises(ValueError, match="k=0"):
        hard_negative_mask(torch.zeros(2, 2), torch.tensor([0, 1]), 0)


# --- training.negatives: the sampler and log-Q values ----------------------------------------


def test_sampler_log_q_hand_values():
    # uniform over I = 4, m = 8 draws: p = 1/4, expected count = 8 * 1/4 = 2 -> log 2
    uniform = NegativeSampler(np.array([0, 5, 1, 2]), LossConfig(), seed=0)
    index, log_q = uniform.sample(8)
    assert index.dtype == torch.int64 and index.shape == (8,)
    assert torch.allclose(log_q, torch.full((8,), math.log(2.0)))
    # popularity, alpha 0.5: counts [0, 1, 4, 4] -> floored [1, 1, 4, 4] -> sqrt [1, 1, 2, 2]
    # -> p = [1/6, 1/6, 1/3, 1/3]; m = 3: log(3 * 1/6) = log 0.5, log(3 * 1/3) = 0
    cfg = LossConfig(negative_sampling="popularity", popularity_alpha=0.5)
    pop = NegativeSampler(np.array([0, 1, 4, 4]), cfg, seed=0)
    assert np.allclose(pop.probabilities, [1 / 6, 1 / 6, 1 / 3, 1 / 3])
    index, log_q = pop.sample(3)
    want = np.where(index.numpy() < 2, math.log(0.5), 0.0)
    assert np.allclose(log_q.numpy(), want)


def test_in_batch_log_q_hand_values():
    # counts [0, 2, 6, 1] -> floored [1, 2, 6, 1], total 10 -> freq [0.1, 0.2, 0.6, 0.1]
    # batch of 5: expected copies [0.5, 1, 3, 0.5] -> log [-0.6931, 0, 1.0986, -0.6931]
    sampler = NegativeSampler(np.array([0, 2, 6, 1]), LossConfig(), seed=0)
    got = sampler.in_batch_log_q(torch.tensor([0, 1, 2, 3, 2]), 5)
    want = torch.tensor([math.log(0.5), 0.0, math.log(3.0), math.log(0.5), math.log(3.0)])
    assert torch.allclose(got, want) and torch.isfinite(got).all()
    with pytest.raises(ValueError, match=r"in \[0, 4\); got \[0, 4\]"):
        sampler.in_batch_log_q(torch.tensor([0, 4]), 5)


@pytest.mark.parametrize("kind", ["uniform", "popularity"])
def test_sampled_frequencies_follow_the_distribution(kind):
    # counts [0, 1, 3, 6, 10], alpha 0.75 -> weights [1, 1, 2.2795, 3.8337, 5.6234] / 13.7366
    counts = np.array([0, 1, 3, 6, 10])
    cfg = LossConfig(negative_sampling=kind, popularity_alpha=0.75)
    sampler = NegativeSampler(counts, cfg, seed=7)
    n = 200_000
    index, _ = sampler.sample(n)
    observed = np.bincount(index.numpy(), minlength=5)
    expected = n * sampler.probabilities
    if kind == "popularity":
        w = np.maximum(counts, 1) ** 0.75
        assert np.allclose(sampler.probabilities, w / w.sum())
    # Pearson chi-square with 4 degrees of freedom: 18.47 is the 0.999 quantile
    assert ((observed - expected) ** 2 / expected).sum() < 18.47
    assert np.abs(observed / n - sampler.probabilities).max() < 0.005  # ~4.5 sigma at p=0.5


def test_sampler_is_seeded_and_rejects_bad_counts():
    cfg = LossConfig(negative_sampling="popularity")
    a, _ = NegativeSampler(np.arange(10), cfg, seed=3).sample(50)
    b, _ = NegativeSampler(np.arange(10), cfg, seed=3).sample(50)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="finite and >= 0"):
        NegativeSampler(np.array([1, -1]), cfg)
    with pytest.raises(ValueError, match="non-empty"):
        NegativeSampler(np.array([]), cfg)
    with pytest.raises(ValueError, match="m=0"):
        NegativeSampler(np.arange(3), cfg).sample(0)


def test_gbce_hand_worked():
    # logits [2, 0, -1], positive 0, catalogue of 5 items: 2 negatives -> alpha = 2 / 4 = 0.5
    # t = 0.75: beta = 0.5 * (0.75 * (1 - 2) + 2) = 0.625
    # loss = -0.625 log sigmoid(2) - log(1 - sigmoid(0)) - log(1 - sigmoid(-1))
    #      = 0.625 * 0.126928 + 0.693147 + 0.313262 = 1.085739
    beta = gbce_beta(torch.tensor([2]), num_items=5, t=0.75)
    assert beta.item() == pytest.approx(0.625)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    got = generalized_bce(logits, torch.tensor([0]), beta)
    assert got.item() == pytest.approx(0.625 * L1P + math.log(2) + math.log1p(math.exp(-1)),
                                       rel=1e-6)
    # t = 0: beta 1, plain BCE summed over the row; t = 1: beta = alpha
    assert gbce_beta(torch.tensor([2]), 5, 0.0).item() == pytest.approx(1.0)
    assert gbce_beta(torch.tensor([2]), 5, 1.0).item() == pytest.approx(0.5)
    # through retrieval_loss: a masked column is not a negative (alpha = 1 / 4)
    cfg = LossConfig(kind="gbce", logq_correction=False, mask_accidental_hits=True)
    q, cand = torch.eye(3)[:1] * 2.0, torch.eye(3)
    loss = retrieval_loss(q, cand, torch.tensor([0]), torch.tensor([7, 7, 8]), cfg, 1.0,
                          num_items=5)
    beta = 0.25 * (0.75 * (1 - 4) + 4)  # 0.4375; columns: 2 (positive), 0 masked (id 7), 0
    assert loss.item() == pytest.approx(beta * L1P + math.log(2), rel=1e-5)
    with pytest.raises(ValueError, match="num_items"):
        retrieval_loss(q, cand, torch.tensor([0]), torch.tensor([7, 7, 8]), cfg, 1.0)
