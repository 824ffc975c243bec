"""Leave-last-out split: hand-worked example and the ML-100K counts of EVALUATION.md."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from pipeline.splits import TEST, TRAIN, VALIDATION
from prepare.split import history_windows, leave_last_out


def test_hand_worked_split_ties_broken_by_row():
    # rows:       0  1  2  3  4  5  6
    users = np.array([5, 5, 5, 5, 9, 9, 7])
    ts = np.array([30, 10, 20, 20, 1, 2, 0])
    sp = leave_last_out(users, ts, min_interactions=2)
    # user 7 has one interaction -> dropped; user 5 sorted: row1(10) row2(20) row3(20) row0(30)
    # users are grouped by code: 5 before 9
    assert sp.order.tolist() == [1, 2, 3, 0, 4, 5]
    assert sp.split.tolist() == [TRAIN, TRAIN, VALIDATION, TEST, VALIDATION, TEST]
    assert sp.group_start.tolist() == [0, 0, 0, 0, 4, 4]
    # histories of length 3 for the test row of user 5 (position 3): positions 0, 1, 2
    win = history_windows(np.array([3, 0, 5]), sp.group_start, 3)
    assert win.tolist() == [[0, 1, 2], [-1, -1, -1], [-1, -1, 4]]


def _ml100k_split(ml100k_dir):
    raw = np.loadtxt(ml100k_dir / "u.data", dtype=np.int64)
    users, items, ts = raw[:, 0], raw[:, 1], raw[:, 3]
    return users, items, ts, leave_last_out(users, ts, min_interactions=3)


def test_every_user_below_the_minimum_gives_an_empty_split():
    sp = leave_last_out(np.array([5, 5, 9]), np.array([1, 2, 3]), min_interactions=3)
    assert (sp.order.tolist(), sp.split.tolist(), sp.group_start.tolist()) == ([], [], [])


def _oracle_split(users: np.ndarray, ts: np.ndarray, min_interactions: int) -> dict[int, list]:
    """Plain Python: per user, input rows sorted by (timestamp, row number)."""
    by_user: dict[int, list] = defaultdict(list)
    for row, (u, t) in enumerate(zip(users.tolist(), ts.tolist(), strict=True)):
        by_user[u].append((t, row))
    return {u: [row for _, row in sorted(rows)] for u, rows in by_user.items()
            if len(rows) >= min_interactions}


def test_ml100k_split_counts_and_no_leakage(ml100k_dir):
    users, items, ts, sp = _ml100k_split(ml100k_dir)
    counts = np.bincount(sp.split, minlength=3)
    assert counts.tolist() == [98_114, 943, 943]
    # every row of every user against the oracle: same time order, the last row the test
    # target, the one before it the validation target (ties: the later line), the rest train
    oracle = _oracle_split(users, ts, 3)
    want = {}
    for rows in oracle.values():
        want.update({r: TRAIN for r in rows[:-2]})
        want.update({rows[-2]: VALIDATION, rows[-1]: TEST})
    assert dict(zip(sp.order.tolist(), sp.split.tolist(), strict=True)) == want
    starts = np.flatnonzero(np.r_[True, np.diff(sp.group_start) != 0])
    got_groups = np.split(sp.order, starts[1:])
    assert {int(users[g[0]]): g.tolist() for g in got_groups} == oracle
    assert (sp.group_start == np.repeat(starts, np.diff(np.r_[starts, len(sp.order)]))).all()
    # histories contain only strictly earlier positions of the same user
    sorted_users = users[sp.order]
    target_pos = np.flatnonzero(sp.split != TRAIN)
    win = history_windows(target_pos, sp.group_start, 50)
    assert (win < target_pos[:, None]).all()
    valid = win >= 0
    assert (sorted_users[np.where(valid, win, 0)][valid] ==
            np.repeat(sorted_users[target_pos], valid.sum(1))).all()
    val_pos = np.flatnonzero(sp.split == VALIDATION)
    assert not np.isin(val_pos + 1, win[sp.split[target_pos] == VALIDATION]).any()


def test_split_stats_hand_worked():
    from prepare.split import leave_last_out, split_stats

    # user 0: times 5 5 6 (one tie in 2 pairs); user 1: 1 2 3 4 (none in 3); user 2 dropped
    codes = np.array([0, 1, 0, 1, 1, 0, 1, 2])
    ts = np.array([5, 1, 5, 2, 3, 6, 4, 9])
    sp = leave_last_out(codes, ts, 3)
    stats = split_stats(sp, ts[sp.order])
    assert (stats.users, stats.interactions) == (2, 7)
    assert stats.median_history == 3.5
    assert stats.tie_rate == round(1 / 5, 4)
    assert "2 users, 7 interactions, median history 3.5, tie rate 0.200" == stats.describe()
