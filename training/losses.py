"""The retrieval loss on a [B, N] score matrix, built from small named pure functions.

Each step is one function (TFRS ``layers/loss.py``), and :func:`retrieval_loss` composes them
in the order of TFRS ``tasks/retrieval.py``:

    scores = query @ candidates.T (+ per-row negatives as extra columns)   [B, N (+ M)]
    -> temperature -> log-Q correction (shared columns only)
    -> accidental-hit masking -> hard-negative mining -> softmax CE, pointwise BCE or gBCE [B]
    -> weighted mean over rows, sum_i w_i * loss_i / sum_i w_i (plain mean without weights)

Temperature comes before log-Q on purpose: the sampled-softmax estimator corrects the
logits the softmax sees, ``s / t - log q``. Subtracting log q first would scale the
correction by ``1 / t`` (20x at t = 0.05) and over-correct.

A masked column gets :func:`mask_value` (a very large negative number, not ``-inf``, so a
row whose every negative is masked still has a finite softmax), so its gradient is exactly
zero. Masks are boolean ``[B, N]`` tensors, True = column dropped.

Under DDP the caller passes the globally gathered candidates and the global column of each
row's positive (``training.distributed``); nothing here knows about ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config.loss import LossConfig, LossKind
from training.masks import (
    accidental_hit_mask,
    hard_negative_mask,
    mask_scores,
    mask_value,
)


def apply_temperature(scores: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Divide scores by the temperature.

    :func:`retrieval_loss` divides the [B, D] query instead of its [B, N] scores: the same
    scores (a product is linear in the query), one pass over D columns instead of N.

    Args:
        scores: [B, N] scores, or [B, D] query embeddings.
        temperature: a positive float, or a scalar tensor (learnable; not checked, to avoid
            a device sync).

    Returns:
        scores / temperature, the shape of ``scores``.
    """
    if not torch.is_tensor(temperature) and not temperature > 0:
        raise ValueError(f"temperature {temperature} must be > 0")
    return scores / temperature


def logq_correction(scores: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Subtract each candidate column's log sampling probability (Yi et al., 2019).

    Args:
        scores: [B, N] logits.
        log_q: [N] log of the probability (or expected count) of each column's candidate
            being in the candidate set.

    Returns:
        [B, N] corrected logits.
    """
    if log_q.shape != scores.shape[1:]:
        raise ValueError(f"log_q has shape {tuple(log_q.shape)}; expected "
                         f"[{scores.shape[1]}], one value per candidate column")
    return scores - log_q[None, :]


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row softmax CE with dropped columns and label smoothing, forward and backward fused.

    The loss of row i is ``-(1 - e) log p_i,pos - e mean_valid(log p_i)`` with ``log p`` the
    log-softmax of the logits after masking; its gradient is ``p - (1 - e) onehot - e valid /
    count``, zero at dropped columns (their probability underflows to 0). Fused, the
    backward is one pass that turns the saved log-probabilities into that gradient, instead
    of a scatter of the gathered positive, a log-softmax backward and the mask's backward:
    on the full-catalogue sequence loss, [positions, catalogue] is the largest tensor of a
    step. Half-precision logits are computed in float32 (as autocast does for
    ``log_softmax``).
    """

    @staticmethod
    def forward(ctx, logits, positive_index, drop, label_smoothing):  # noqa: D102
        x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        if drop is not None:
            x = x.masked_fill(drop, mask_value(x.dtype))
        log_p = torch.log_softmax(x, dim=1)  # [B, N]
        loss = -log_p.gather(1, positive_index[:, None])[:, 0]
        share = None
        if label_smoothing:
            if drop is None:
                share = torch.full_like(loss, label_smoothing / x.shape[1])
                uniform = -log_p.mean(dim=1)
            else:
                count = (~drop).sum(dim=1).to(x.dtype)
                share = label_smoothing / count
                uniform = -log_p.masked_fill(drop, 0.0).sum(dim=1) / count
            loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
        ctx.save_for_backward(log_p, positive_index, drop, share)
        ctx.label_smoothing, ctx.dtype = label_smoothing, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        log_p, positive_index, drop, share = ctx.saved_tensors
        g = log_p.exp()  # [B, N] softmax; 0 at dropped columns
        if share is not None:
            g.sub_(share[:, None])
            if drop is not None:
                g.masked_fill_(drop, 0.0)
        rows = torch.arange(len(g), device=g.device)
        g[rows, positive_index] -= 1.0 - ctx.label_smoothing
        return g.mul_(grad[:, None]).to(ctx.dtype), None, None, None


def softmax_cross_entropy(
    logits: torch.Tensor,
    positive_index: torch.Tensor,
    label_smoothing: float = 0.0,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row softmax cross-entropy with the positive's column as the label.

    Columns outside ``valid_mask`` take no part: they get :func:`mask_value` (the caller's
    tensor is not changed) and no target mass. Label smoothing spreads ``label_smoothing``
    uniformly over the row's valid columns (positive included), so with no mask it equals
    ``F.cross_entropy(label_smoothing=...)``. Forward and backward are fused
    (:class:`_SoftmaxCrossEntropy`).

    Args:
        logits: [B, N] logits.
        positive_index: [B] column of each row's positive (always valid).
        label_smoothing: in [0, 1).
        valid_mask: [B, N] bool, True where the column takes part; default all.

    Returns:
        [B] loss per row.
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing {label_smoothing} must be in [0, 1)")
    drop = None if valid_mask is None else ~valid_mask
    return _SoftmaxCrossEntropy.apply(logits, positive_index, drop, label_smoothing)


def pointwise_bce(
    logits: torch.Tensor, positive_index: torch.Tensor, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row binary cross-entropy: label 1 in the positive's column, 0 elsewhere.

    Args:
        logits: [B, N] logits.
        positive_index: [B] column of each row's positive.
        valid_mask: [B, N] bool, True where the column takes part; default all.

    Returns:
        [B] mean BCE over each row's valid columns.
    """
    labels = F.one_hot(positive_index, logits.shape[1]).to(logits.dtype)  # [B, N]
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    if valid_mask is None:
        return bce.mean(dim=1)
    return torch.where(valid_mask, bce, 0.0).sum(dim=1) / valid_mask.sum(dim=1)


def gbce_beta(negatives: torch.Tensor, num_items: int, t: float) -> torch.Tensor:
    """The power of the positive term in gSASRec: ``alpha * (t * (1 - 1 / alpha) + 1 / alpha)``.

    ``alpha = negatives / (num_items - 1)`` is the share of the catalogue's negatives a row
    sees. ``t = 1`` calibrates the sigmoid to the full-softmax probabilities; ``t = 0``
    gives ``beta = 1``, plain BCE.

    Args:
        negatives: [B] number of negatives each row is scored against.
        num_items: catalogue size I >= 2.
        t: calibration in [0, 1].

    Returns:
        [B] beta.
    """
    alpha = negatives.clamp(min=1).to(torch.float32) / max(1, num_items - 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def generalized_bce(
    logits: torch.Tensor, positive_index: torch.Tensor, beta: torch.Tensor,
    valid_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row gBCE: ``-beta * log sigmoid(s+) - sum over negatives of log(1 - sigmoid(s-))``.

    Args:
        logits: [B, N] logits.
        positive_index: [B] column of each row's positive.
        beta: [B] power of the positive's probability (:func:`gbce_beta`).
        valid_mask: [B, N] bool, True where the column takes part; default all.

    Returns:
        [B] loss per row (summed over its negatives, as in the paper).
    """
    rows = torch.arange(len(positive_index), device=logits.device)
    positive = logits[rows, positive_index]  # [B]
    negative = F.logsigmoid(-logits)  # [B, N]: log(1 - sigmoid(s))
    is_negative = torch.ones_like(logits, dtype=torch.bool)
    is_negative[rows, positive_index] = False
    if valid_mask is not None:
        is_negative &= valid_mask
    return -beta.to(logits.dtype) * F.logsigmoid(positive) - torch.where(
        is_negative, negative, 0.0).sum(dim=1)


def weighted_mean(
    losses: torch.Tensor, weights: torch.Tensor | None = None,
    total: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Per-example weighted mean: ``sum_i w_i * loss_i / total``, ``total = sum_i w_i``.

    Weights are ``data.weight`` (finite, >= 0; prepare rejects anything else). A batch whose
    weights are all 0 gives a loss of 0, not NaN (the normaliser is clamped to a tiny
    positive number). Under DDP the caller passes ``total`` = the sum of weights over every
    rank divided by the world size, so that DDP's average of the per-rank losses is the
    weighted mean over the global batch (see :mod:`training.distributed`).

    Args:
        losses: [B] per-row losses.
        weights: [B] per-row weights; None is the plain mean.
        total: the normaliser; default ``weights.sum()``.

    Returns:
        Scalar loss.
    """
    if weights is None:
        return losses.mean()
    if weights.shape != losses.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must be [{losses.shape[0]}], one "
                         "per row")
    weights = weights.to(losses.dtype)
    total = weights.sum() if total is None else total
    return (weights * losses).sum() / torch.clamp(torch.as_tensor(total), min=1e-12)


def _union(drop: torch.Tensor | None, more: torch.Tensor) -> torch.Tensor:
    """``drop | more``, where ``drop`` None means no column dropped yet."""
    return more if drop is None else drop | more


def _check_inputs(
    query: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    candidate_ids: torch.Tensor,
    cfg: LossConfig,
    candidate_log_q: torch.Tensor | None,
    row_negatives: torch.Tensor | None,
    row_negative_ids: torch.Tensor | None,
) -> None:
    """Raise ValueError naming the argument when shapes or the config do not fit."""
    if query.ndim != 2 or candidates.ndim != 2 or query.shape[1] != candidates.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and candidates {tuple(candidates.shape)} "
                         "must be [B, D] and [N, D] with the same D")
    b, n = query.shape[0], candidates.shape[0]
    if positive_index.shape != (b,) or candidate_ids.shape != (n,):
        raise ValueError(f"positive_index {tuple(positive_index.shape)} must be [{b}] and "
                         f"candidate_ids {tuple(candidate_ids.shape)} must be [{n}]")
    if cfg.logq_correction and candidate_log_q is None:
        raise ValueError("logq_correction=true needs candidate_log_q [N]; pass it or set "
                         "logq_correction false")
    if not cfg.logq_correction and candidate_log_q is not None:
        raise ValueError("candidate_log_q was given but logq_correction=false would ignore it")
    if (row_negatives is None) != (row_negative_ids is None):
        raise ValueError("row_negatives [B, M, D] and row_negative_ids [B, M] go together: "
                         "ids are needed to mask padding and accidental hits")
    if row_negatives is None:
        return
    if cfg.impressions_column is None:
        raise ValueError("row_negatives were given but loss.impressions_column is not set")
    m = row_negative_ids.shape[1] if row_negative_ids.ndim == 2 else -1
    if row_negatives.shape != (b, m, query.shape[1]) or row_negative_ids.shape != (b, m):
        raise ValueError(f"row_negatives {tuple(row_negatives.shape)} and row_negative_ids "
                         f"{tuple(row_negative_ids.shape)} must be [{b}, M, {query.shape[1]}] "
                         f"and [{b}, M]")


def retrieval_loss(
    query: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    candidate_ids: torch.Tensor,
    cfg: LossConfig,
    temperature: float | torch.Tensor,
    candidate_log_q: torch.Tensor | None = None,
    row_negatives: torch.Tensor | None = None,
    row_negative_ids: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    weight_total: torch.Tensor | float | None = None,
    num_items: int | None = None,
    banned: torch.Tensor | None = None,
) -> torch.Tensor:
    """The retrieval loss of a batch: (weighted) mean over rows of softmax CE, BCE or gBCE.

    With ``weights`` the batch loss is ``sum_i w_i * loss_i / sum_i w_i`` (:func:`weighted_mean`;
    under DDP ``weight_total`` carries the global normaliser), without it the plain mean.

    Columns are the shared candidates (in-batch items, then any sampled extra negatives),
    followed by each row's own negatives (impressions: shown, not clicked). A row negative
    with id < 0 is padding and always masked; log-Q applies to shared columns only, as row
    negatives were not sampled. ``cfg.hard_negatives`` larger than the available negatives
    keeps them all (see :func:`hard_negative_mask`).

    Args:
        query: [B, D] query (user) embeddings.
        candidates: [N, D] candidate (item) embeddings, globally gathered under DDP.
        positive_index: [B] column in ``candidates`` of each row's positive.
        candidate_ids: [N] item id of each candidate (for accidental hits).
        cfg: the loss section of the config.
        temperature: positive float or scalar tensor; scores are divided by it.
        candidate_log_q: [N] log sampling probability per candidate; required exactly when
            ``cfg.logq_correction``.
        row_negatives: [B, M, D] per-row negative embeddings.
        row_negative_ids: [B, M] their item ids, -1 for padding.
        weights: [B] per-row loss weights (``data.weight``), finite and >= 0.
        weight_total: the weights' normaliser; default ``weights.sum()``.
        num_items: catalogue size; required by ``kind=gbce`` (its beta).
        banned: [B, N] bool shared candidates left out of each row's loss (e.g. items the
            user already had); never a row's positive.

    Returns:
        Scalar (weighted) mean loss.
    """
    _check_inputs(query, candidates, positive_index, candidate_ids, cfg, candidate_log_q,
                  row_negatives, row_negative_ids)
    if banned is not None and banned.shape != (len(query), len(candidates)):
        raise ValueError(f"banned {tuple(banned.shape)} must be [B, N] = "
                         f"{(len(query), len(candidates))}")
    query = apply_temperature(query, temperature)  # (q / t) @ c = (q @ c) / t, on [B, D]
    scores = query @ candidates.T  # [B, N]
    if cfg.logq_correction:
        scores = logq_correction(scores, candidate_log_q)
    column_ids = candidate_ids.expand(len(query), -1)  # [B, N]
    drop = banned  # [B, N] bool, True = column left out; None = none yet
    if row_negatives is not None:
        row_scores = torch.einsum("bd,bmd->bm", query, row_negatives)  # [B, M]
        shared = torch.zeros_like(scores, dtype=torch.bool) if drop is None else drop
        scores = torch.cat([scores, row_scores], dim=1)
        column_ids = torch.cat([column_ids, row_negative_ids], dim=1)  # [B, N + M]
        drop = torch.cat([shared, row_negative_ids < 0], dim=1)
    if cfg.mask_accidental_hits:
        positive_ids = candidate_ids[positive_index]  # [B]
        drop = _union(drop, accidental_hit_mask(positive_ids, column_ids, positive_index))
    if cfg.hard_negatives:
        with torch.no_grad():  # a choice of columns: no gradient through the ranking
            ranked = scores if drop is None else mask_scores(scores, drop)
            drop = _union(drop, ~hard_negative_mask(ranked, positive_index, cfg.hard_negatives))
    if cfg.kind is LossKind.SOFTMAX:  # masks inside, fused with its backward
        per_row = _SoftmaxCrossEntropy.apply(scores, positive_index, drop, cfg.label_smoothing)
    else:
        valid = torch.ones_like(scores, dtype=torch.bool) if drop is None else ~drop
        scores = scores if drop is None else mask_scores(scores, drop)
        if cfg.kind is LossKind.BCE:
            per_row = pointwise_bce(scores, positive_index, valid)
        else:
            if num_items is None:
                raise ValueError("loss.kind=gbce needs num_items (the catalogue size) for "
                                 "its beta")
            beta = gbce_beta(valid.sum(dim=1) - 1, num_items, cfg.gbce_t)
            per_row = generalized_bce(scores, positive_index, beta, valid)
    return weighted_mean(per_row, weights, weight_total)
