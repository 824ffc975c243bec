"""Leave-last-out split, as ``../shared/EVALUATION.md`` defines it (pure numpy).

Each user's interactions are ordered by ``(timestamp, input row number)``; the last one
is the test target, the one before it the validation target, the rest is training. A
row's history is every earlier interaction of the same user, so a validation row sees
training items only and a test row sees training + validation items: targets never leak
into the inputs they are scored with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.splits import TEST, TRAIN, VALIDATION

MIN_WITH_TRAINING = 3  # a user with fewer interactions has no training row (test, validation)


@dataclass(frozen=True)
class Split:
    """Interactions in time order per user.

    Attributes:
        order: [N'] input row numbers sorted by (user, timestamp, row); dropped users removed.
        split: [N'] TRAIN / VALIDATION / TEST label of each sorted row.
        group_start: [N'] sorted position of the first row of the same user.
    """

    order: np.ndarray
    split: np.ndarray
    group_start: np.ndarray

    def rows(self, which: int | tuple[int, ...]) -> np.ndarray:
        """Sorted positions of one split (or of several), in (user, time) order."""
        return np.flatnonzero(np.isin(self.split, which))


def leave_last_out(user_codes: np.ndarray, timestamps: np.ndarray, min_interactions: int) -> Split:
    """Split interactions per user by time.

    Args:
        user_codes: [N] integer user codes (any deterministic encoding of the ids).
        timestamps: [N] int64 times; ties are broken by the input row number.
        min_interactions: users with fewer interactions are dropped.

    Returns:
        The :class:`Split`.
    """
    n = len(user_codes)
    order = np.lexsort((np.arange(n), timestamps, user_codes))  # last key is primary
    users = user_codes[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if n else np.zeros(0, int)
    counts = np.diff(np.r_[starts, n])
    keep = np.repeat(counts >= min_interactions, counts)
    counts = counts[counts >= min_interactions]
    order = order[keep]
    new_starts = (np.cumsum(counts) - counts).astype(np.int64)  # empty when none is kept
    group_start = np.repeat(new_starts, counts)
    from_end = np.repeat(new_starts + counts, counts) - 1 - np.arange(len(order))
    split = np.select([from_end == 0, from_end == 1], [TEST, VALIDATION], TRAIN).astype(np.int8)
    return Split(order=order, split=split, group_start=group_start)


def history_windows(positions: np.ndarray, group_start: np.ndarray, max_length: int) -> np.ndarray:
    """Sorted positions of each row's last ``max_length`` earlier interactions.

    Args:
        positions: [B] sorted positions of the rows.
        group_start: [N'] first sorted position of each row's user.
        max_length: L.

    Returns:
        [B, L] int64 positions, pre-padded with -1 (most recent at column L - 1).
    """
    cols = positions[:, None] - max_length + np.arange(max_length)[None, :]  # [B, L]
    return np.where(cols >= group_start[positions][:, None], cols, -1)


def sequence_windows(positions: np.ndarray, group_start: np.ndarray, length: int,
                     stride: int | None = None) -> np.ndarray:
    """Cut each user's training positions into windows of ``length`` items, newest last.

    ``positions`` holds the training split's sorted positions; a user's are contiguous and
    oldest first. The newest window ends at the user's last training item; each older one
    ends ``stride`` items earlier, until one reaches the user's first item. With the
    default stride (``length - 1``) consecutive windows share one item and every
    transition (item t -> item t + 1) lies inside exactly one window; a smaller stride
    overlaps them, so a transition lies in about ``(length - 1) / stride`` windows, at
    different places. The oldest window is pre-padded. Users with fewer than two training
    items give no window (nothing to predict from anything).

    Args:
        positions: [N] sorted positions of the training rows, grouped by user.
        group_start: [N'] first sorted position of each position's user (all rows).
        length: items per window, L + 1 (L inputs and their L next items).
        stride: items between the ends of consecutive windows, 1 .. L (None: L).

    Returns:
        [W, length] int64 sorted positions, -1 = padding, oldest user first.
    """
    if length < 2:
        raise ValueError(f"a training window needs at least 2 items, got length {length}")
    step = length - 1 if stride is None else stride
    if not 1 <= step <= length - 1:
        raise ValueError(f"window stride {step} is outside 1 .. {length - 1} (windows of "
                         f"{length} items)")
    if not len(positions):
        return np.zeros((0, length), np.int64)
    owner = group_start[positions]
    first = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])  # [U] index into positions
    count = np.diff(np.r_[first, len(positions)])  # [U] training items per user
    keep = count >= 2
    first, count = first[keep], count[keep]
    windows = 1 + np.maximum(0, -(-(count - length) // step))  # [U] ceil, at least one
    user = np.repeat(np.arange(len(count)), windows)  # [W]
    newest_first = np.arange(len(user)) - np.repeat(np.cumsum(windows) - windows, windows)
    end = first[user] + count[user] - newest_first * step  # [W] exclusive end (index)
    cols = end[:, None] - length + np.arange(length)[None, :]  # [W, length] indices
    order = np.lexsort((-newest_first, user))  # per user: oldest window first
    cols, start = cols[order], first[user][order]
    return np.where(cols >= start[:, None], positions[np.maximum(cols, 0)], -1).astype(np.int64)


@dataclass(frozen=True)
class SplitStats:
    """What a data set looks like once split: the figures its settings depend on."""

    users: int
    interactions: int
    median_history: float  # interactions per user (median)
    tie_rate: float  # share of a user's consecutive interactions that share a timestamp

    def describe(self) -> str:
        """The one log line of these figures."""
        return (f"{self.users:,} users, {self.interactions:,} interactions, median history "
                f"{self.median_history:g}, tie rate {self.tie_rate:.3f}")


def split_stats(sp: Split, timestamps: np.ndarray) -> SplitStats:
    """Users, interactions, median history length and tie rate of a split.

    Args:
        sp: the split (:func:`leave_last_out`).
        timestamps: [N'] int64 times in the split's sorted order (``ts[sp.order]``).
    """
    n = len(sp.order)
    if not n:
        return SplitStats(0, 0, 0.0, 0.0)
    starts = np.unique(sp.group_start)
    counts = np.diff(np.r_[starts, n])
    ts = timestamps
    same_user = sp.group_start[1:] == sp.group_start[:-1]
    pairs = int(same_user.sum())
    ties = int((same_user & (ts[1:] == ts[:-1])).sum())
    return SplitStats(users=len(starts), interactions=n,
                      median_history=float(np.median(counts)),
                      tie_rate=round(ties / pairs, 4) if pairs else 0.0)
