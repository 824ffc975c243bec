"""Negatives shared by a batch, and the log-Q of every candidate (mixed negative sampling).

A batch's candidates are its own items (drawn from the training stream, so with probability
proportional to their training frequency) followed by ``extra_negatives`` items sampled
here, uniformly or with probability ~ count^alpha (Yang et al., 2020, mixed negative
sampling). The loss subtracts log-Q per candidate column; both kinds use the *expected
number of copies of the item in the candidate set*, so the two parts are on one scale:

    sampled, m draws with replacement:   log Q(i) = log(m * p(i))
    in-batch, batch of size B:           log Q(i) = log(B * count(i) / total)

Counts are floored at 1 before anything else (add-floor smoothing), so an item never seen
in training (index 0, padding; a cold item) still has a finite log and can be sampled.
Under DDP, ``batch_size`` is the global batch (the candidates are gathered), and each rank
should seed its sampler differently (``seed + rank``) so ranks draw different negatives.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config.loss import LossConfig, NegativeSampling


def smoothed_counts(item_counts: np.ndarray) -> np.ndarray:
    """Training counts as float64, floored at 1 so every log is finite.

    Args:
        item_counts: [I] non-negative training count per item index.

    Returns:
        [I] float64 counts >= 1.
    """
    counts = np.asarray(item_counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"item_counts has shape {counts.shape}; expected a non-empty [I] array")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("item_counts must be finite and >= 0 (a training count per item)")
    return np.maximum(counts.astype(np.float64), 1.0)


def sampling_probabilities(item_counts: np.ndarray, cfg: LossConfig) -> np.ndarray:
    """Per-item probability of one draw: uniform, or smoothed count ^ popularity_alpha.

    Args:
        item_counts: [I] training count per item index.
        cfg: the loss section (``negative_sampling``, ``popularity_alpha``).

    Returns:
        [I] float64 probabilities summing to 1.
    """
    counts = smoothed_counts(item_counts)
    if cfg.negative_sampling is NegativeSampling.UNIFORM:
        return np.full(len(counts), 1.0 / len(counts))
    weights = counts**cfg.popularity_alpha
    return weights / weights.sum()


class NegativeSampler:
    """Draws the extra negatives of a batch and gives the log-Q of every candidate.

    Args:
        item_counts: [I] training count per item index (the row of the item table).
        cfg: the loss section of the config.
        seed: seed of the sampler's own generator (use ``seed + rank`` under DDP).
    """

    def __init__(self, item_counts: np.ndarray, cfg: LossConfig, seed: int = 0):
        counts = smoothed_counts(item_counts)
        self.probabilities = sampling_probabilities(item_counts, cfg)  # [I]
        self._cdf = np.cumsum(self.probabilities)
        self._log_frequency = torch.from_numpy(np.log(counts / counts.sum())).float()  # [I]
        self._uniform = cfg.negative_sampling is NegativeSampling.UNIFORM
        self._rng = np.random.default_rng(seed)

    @property
    def num_items(self) -> int:
        """Number of item indices I the sampler draws from."""
        return len(self.probabilities)

    def sample(self, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``m`` item indices with replacement.

        Args:
            m: number of negatives, >= 1.

        Returns:
            ``(item_index, log_q)``: [M] int64 indices and [M] float32 ``log(m * p)``.
        """
        if m < 1:
            raise ValueError(f"number of sampled negatives m={m} must be >= 1")
        if self._uniform:
            index = self._rng.integers(0, self.num_items, m)
        else:  # inverse-CDF: O(m log I) per call instead of rebuilding a table
            u = self._rng.random(m) * self._cdf[-1]
            index = np.minimum(np.searchsorted(self._cdf, u, side="right"), self.num_items - 1)
        log_q = np.log(m * self.probabilities[index])
        return torch.from_numpy(index.astype(np.int64)), torch.from_numpy(log_q).float()

    def in_batch_log_q(self, item_index: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Log of the expected count of each item in a batch: ``log(batch_size * count / total)``.

        Args:
            item_index: [B] item indices of the batch's positives (any device).
            batch_size: items per batch (the global batch under DDP), >= 1.

        Returns:
            [B] float32 on ``item_index``'s device.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        index = item_index.detach().cpu().long()
        if index.numel() and (index.min() < 0 or index.max() >= self.num_items):
            raise ValueError(f"item_index values must be in [0, {self.num_items}); got "
                             f"[{int(index.min())}, {int(index.max())}]")
        log_q = self._log_frequency[index] + float(np.log(batch_size))
        return log_q.to(item_index.device)
