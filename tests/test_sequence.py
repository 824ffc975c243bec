"""The sequence training mode: windows, clm / mlm positions, the multi-position loss, serving."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from indexing.batches import to_tensors
from pipeline.arrow import table_to_numpy
from pipeline.columns import (
    SEQUENCE_ITEMS,
    SEQUENCE_TIMES,
    SEQUENCE_WEIGHTS,
    USER,
    tower_columns,
    tower_inputs,
)
from pipeline.config import Objective
from pipeline.config.checks import sequence_mode
from pipeline.config.model import TowerConfig
from pipeline.run_dir import RunDir, read_split, read_table
from pipeline.splits import TRAIN
from prepare.split import leave_last_out, sequence_windows
from tests.conftest import SEQUENCE_OVERRIDES, demo_config
from towers.exported import ExportedTower
from towers.model import load_trained
from training.loop import run_plain, setup
from training.sequence import history_keys, positions_of, seen_mask, shuffle_ties

CLM = SEQUENCE_OVERRIDES
MIN_TIME = int(np.iinfo(np.int64).min)  # a padded position's timestamp
MLM = ("model.user.type=transformer", "model.user.transformer.causal=false",
       "model.user.transformer.dim=16", "model.user.transformer.num_layers=1",
       "sequence.objective=mlm", "sequence.mask_probability=0.3", "train.batch_size=16")


# -- windows -----------------------------------------------------------------------------


def test_windows_cover_every_transition_once_and_only_training_rows():
    # sorted positions: user A 0..11 (train 0..9), user B 12..14 (train 12 only),
    # user C 15..19 (train 15..17)
    group_start = np.array([0] * 12 + [12] * 3 + [15] * 5)
    sp_split = np.array([TRAIN] * 10 + [1, 2] + [TRAIN, 1, 2] + [TRAIN] * 3 + [1, 2])
    train = np.flatnonzero(sp_split == TRAIN)
    w = sequence_windows(train, group_start, length=4)
    # A: 10 items, windows of 4 sharing one item: ends 10, 7, 4 -> [6..9], [3..6], [0..3]
    # (oldest first); B has one training item (no window); C: 3 items, one padded window
    assert w.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9], [-1, 15, 16, 17]]
    pairs = {(int(a), int(b)) for row in w for a, b in zip(row[:-1], row[1:], strict=True)
             if a >= 0}
    assert pairs == {(i, i + 1) for i in range(9)} | {(15, 16), (16, 17)}
    assert len(pairs) == sum(len(row[row >= 0]) - 1 for row in w)  # each transition once


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_windows_against_a_per_user_oracle(seed):
    rng = np.random.default_rng(seed)
    users = rng.integers(0, 30, 400)
    sp = leave_last_out(users, rng.integers(0, 50, 400), min_interactions=3)
    train = sp.rows(TRAIN)
    length = int(rng.integers(2, 9))
    stride = None if seed < 3 else int(rng.integers(1, length))
    got = sequence_windows(train, sp.group_start, length, stride)
    expected = []
    for start in np.unique(sp.group_start):
        mine = [p for p in train if sp.group_start[p] == start]
        end = len(mine)
        rows = []
        while len(mine) >= 2:
            window = mine[max(0, end - length):end]
            rows.append([-1] * (length - len(window)) + window)
            if end - length <= 0:
                break
            end -= length - 1 if stride is None else stride
        expected += rows[::-1]
    assert got.tolist() == expected


def test_overlapping_windows_give_each_transition_more_of_its_past():
    # one user, training items 0..9; windows of 4 items (3 transitions) ending 2 apart
    w = sequence_windows(np.arange(10), np.zeros(12, np.int64), length=4, stride=2)
    assert w.tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    # transitions inside the two-item overlaps (2->3, 4->5, 6->7) lie in two windows
    times = [sum(1 for row in w.tolist() for a, b in zip(row[:-1], row[1:], strict=True)
                 if (a, b) == (i, i + 1)) for i in range(9)]
    assert times == [1, 1, 2, 1, 2, 1, 2, 1, 1]
    with pytest.raises(ValueError, match="stride 4 is outside 1 .. 3"):
        sequence_windows(np.arange(10), np.zeros(12, np.int64), length=4, stride=4)


def test_window_stride_longer_than_the_history_is_refused(demo_data):
    with pytest.raises(ValueError, match=r"window_stride=60 is longer than the 'history' "
                                         r"history's max_length=50"):
        demo_config(demo_data, *CLM, "sequence.window_stride=60")


# -- clm / mlm worked by hand on a 5-item sequence ---------------------------------------


def _window_batch(items: list[int]) -> dict[str, torch.Tensor]:
    """One window [L + 1] whose history ids are the items + 10 (catalogue rows = items)."""
    rows = torch.tensor([items])
    return {"user__history": torch.where(rows >= 0, rows + 10, 0),
            "user__age": torch.tensor([3]), SEQUENCE_ITEMS: rows,
            SEQUENCE_WEIGHTS: (rows >= 0).float()}


def test_clm_positions_see_the_past_and_predict_the_next_item():
    # items 1..5 in a window of L + 1 = 6: [pad, 1, 2, 3, 4, 5]
    p = positions_of(_window_batch([-1, 1, 2, 3, 4, 5]), frozenset({"history"}), Objective.CLM)
    assert p.inputs["history"].tolist() == [[0, 11, 12, 13, 14]]  # items 0 .. L-1
    assert p.inputs["age"].tolist() == [3]  # static features untouched
    assert p.targets.tolist() == [[1, 2, 3, 4, 5]]
    # position 0 is padding: it has no input to predict item 1 from
    assert p.trained.tolist() == [[False, True, True, True, True]]
    assert p.masked is None


def test_mlm_masks_positions_that_predict_their_own_item():
    gen = torch.Generator().manual_seed(0)
    batch = _window_batch([-1, 1, 2, 3, 4, 5])
    p = positions_of(batch, frozenset({"history"}), Objective.MLM, 0.5, gen)
    assert p.inputs["history"].tolist() == [[11, 12, 13, 14, 15]]  # items 1 .. L
    assert p.targets.tolist() == [[1, 2, 3, 4, 5]]  # each position's own item
    assert torch.equal(p.trained, p.masked) and p.masked.any()
    # the same draw as positions_of makes: 5 uniforms, then one for the last position
    gen = torch.Generator().manual_seed(0)
    draw, last = torch.rand((1, 5), generator=gen), torch.rand(1, generator=gen)
    expected = draw < 0.5
    expected[:, -1] |= last < 0.5
    assert torch.equal(p.masked, expected)
    # a padded position is never masked
    pad = positions_of(_window_batch([-1, -1, 2, 3, 4, 5]), frozenset({"history"}),
                       Objective.MLM, 0.99, torch.Generator().manual_seed(1))
    assert not pad.masked[0, 0] and pad.masked[0, 1:].all()


# -- ties shuffled within equal timestamps ----------------------------------------------


def test_shuffle_ties_reorders_only_within_equal_timestamps_and_moves_every_column():
    items = [-1, -1, 1, 2, 3, 4, 5, 6, 7]
    times = [MIN_TIME, MIN_TIME, 5, 7, 7, 7, 9, 9, 12]
    batch = _window_batch(items) | {SEQUENCE_TIMES: torch.tensor([times]),
                                    SEQUENCE_WEIGHTS: torch.tensor([[0, 0, 1, 2, 3, 4, 5, 6,
                                                                     7.0]])}
    gen = torch.Generator().manual_seed(0)
    orders = set()
    for _ in range(200):
        out = shuffle_ties(batch, frozenset({"history"}), gen)
        got = out[SEQUENCE_ITEMS][0].tolist()
        orders.add(tuple(got))
        assert out[SEQUENCE_TIMES][0].tolist() == times  # runs stay where they are
        assert got[:3] == [-1, -1, 1] and got[-1] == 7  # padding, single-item runs kept
        assert sorted(got[3:6]) == [2, 3, 4] and sorted(got[6:8]) == [5, 6]
        # the history ids (items + 10) and weights travel with their item
        assert out["user__history"][0].tolist() == [i + 10 if i >= 0 else 0 for i in got]
        assert out[SEQUENCE_WEIGHTS][0].tolist() == [max(i, 0) for i in got]
        assert out["user__age"].tolist() == [3]
    assert len(orders) == 3 * 2 * 2  # every order of the 3-tie and of the 2-tie appears


def test_shuffle_ties_leaves_distinct_times_alone_and_asks_for_a_new_prepare():
    batch = _window_batch([-1, 1, 2, 3]) | {SEQUENCE_TIMES: torch.tensor([[MIN_TIME, 1, 2, 3]])}
    out = shuffle_ties(batch, frozenset({"history"}), torch.Generator().manual_seed(0))
    assert all(torch.equal(out[k], batch[k]) for k in batch)
    with pytest.raises(ValueError, match="run jobs.prepare again"):
        shuffle_ties(_window_batch([-1, 1, 2, 3]), frozenset({"history"}))


# -- the items a position's user already had leave its candidates ------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_seen_mask_against_a_loop(seed, causal):
    rng = np.random.default_rng(seed)
    window = torch.as_tensor(rng.integers(0, 12, (6, 8)))  # repeats included
    window[:, :3] = torch.where(torch.as_tensor(rng.random((6, 3)) < 0.5), -1, window[:, :3])
    trained = (window >= 0) & torch.as_tensor(rng.random((6, 8)) < 0.7)
    cands = torch.as_tensor(rng.permutation(14)[:10])  # some ids are in no window
    positive = torch.as_tensor(rng.integers(0, 10, int(trained.sum())))  # columns
    got = seen_mask(window, cands, trained, positive, causal)
    expected = []
    for p, (b, t) in enumerate(trained.nonzero().tolist()):
        visible = window[b, :t + 1] if causal else window[b]
        seen = {int(i) for i in visible if i >= 0}
        expected.append([int(c) in seen and j != int(positive[p])
                         for j, c in enumerate(cands.tolist())])
    assert got.tolist() == expected


def test_seen_mask_worked_by_hand():
    # inputs [pad, 3, 1, 3]; position t predicts targets [1, 3, 2, 5]; candidates 0..5
    window = torch.tensor([[-1, 3, 1, 3]])
    trained = torch.tensor([[False, True, True, True]])
    got = seen_mask(window, torch.arange(6), trained, torch.tensor([1, 2, 3]), causal=True)
    assert got.int().tolist() == [[0, 0, 0, 1, 0, 0],  # sees 3; its target 1 stays
                                  [0, 1, 0, 1, 0, 0],  # sees 3, 1
                                  [0, 1, 0, 0, 0, 0]]  # sees 3, 1, 3; target 3 is a repeat


# -- config errors name the reason and the fix --------------------------------------------


@pytest.mark.parametrize(("objective", "tower", "message"), [
    (Objective.CLM, {"type": "mlp"}, "type to transformer"),
    (Objective.CLM, {"type": "transformer"}, "transformer.causal=true"),
    (Objective.MLM, {"type": "transformer", "transformer": {"causal": True}},
     "transformer.causal=false"),
    (Objective.MLM, {"type": "cnn"}, "type=cnn only looks back"),
    (Objective.CLM, {"type": "transformer", "transformer": {"causal": True, "pooling": "mean"}},
     "pooling=mean; set it to last"),
    (Objective.CLM, {"type": "transformer", "transformer": {"causal": True},
                     "mlp": {"norm": "batch"}}, "norm=batch"),
])
def test_invalid_combinations_fail_with_the_reason_and_the_fix(objective, tower, message):
    with pytest.raises(ValueError, match=message):
        sequence_mode(objective, None, TowerConfig.model_validate(tower), ["history"])


def test_sequence_mode_needs_one_sequence_feature(demo_data):
    with pytest.raises(ValueError, match="exactly one user sequence feature"):
        sequence_mode(Objective.CLM, "other", TowerConfig.model_validate(
            {"type": "transformer", "transformer": {"causal": True}}), ["history"])
    with pytest.raises(ValueError, match="impressions_column"):
        demo_config(demo_data, *CLM, "loss.impressions_column=impressions")
    assert sequence_mode(Objective.CLM, None, TowerConfig.model_validate(
        {"type": "cnn", "cnn": {"pooling": "last"}}), ["history"]) == "history"


# -- prepare: no leakage ------------------------------------------------------------------


def test_sequences_hold_each_users_training_items_in_order_and_nothing_else(demo_prepared):
    run = RunDir(demo_prepared)
    seqs = read_split(run, "sequences").to_pydict()
    train = read_split(run, "train", ["user_id", "item_index", "timestamp"]).to_pydict()
    rebuilt: dict[int, list[tuple[int, int]]] = {}
    for user, items, times in zip(seqs["user_id"], seqs[SEQUENCE_ITEMS],
                                  seqs[SEQUENCE_TIMES], strict=True):
        real = [(i, t) for i, t in zip(items, times, strict=True) if i >= 0]
        assert all(t == MIN_TIME for i, t in zip(items, times, strict=True) if i < 0)
        mine = rebuilt.setdefault(user, [])
        if mine:  # consecutive windows share one item
            assert mine[-1] == real[0]
            real = real[1:]
        mine.extend(real)
    expected: dict[int, list[tuple[int, int]]] = {}
    for user, item, time in zip(train["user_id"], train["item_index"], train["timestamp"],
                                strict=True):
        expected.setdefault(user, []).append((item, time))  # prepare writes (user, time) order
    # every user with >= 2 training items, exactly their training items (and times), oldest
    # first: no validation or test interaction is an input or a label of any training position
    assert rebuilt == {u: v for u, v in expected.items() if len(v) >= 2}
    # the history columns are the same windows in the history vocabulary
    hist = np.array(seqs["user__history"])
    assert ((hist == 0) == (np.array(seqs[SEQUENCE_ITEMS]) < 0)).all()


# -- the loss at every position equals a per-position loop --------------------------------


def _sequence_setup(demo_prepared, demo_data, tmp_path, *extra):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_prepared / "prepared", run_dir / "prepared")
    cfg = demo_config(demo_data, *CLM, "data.weight=null", *extra)
    s = setup(cfg, run_dir, torch.device("cpu"), world_size=1, rank=0)
    batch = {k: v[:8].clone() for k, v in s.shard.items()}  # the first 8 windows
    return s, batch


@pytest.mark.parametrize("exclude_seen", [False, True])
@pytest.mark.parametrize("candidates", ["full", "sampled"])
def test_multi_position_loss_equals_a_per_position_loop(demo_prepared, demo_data, tmp_path,
                                                        candidates, exclude_seen):
    extra = ["loss.logq_correction=false", "loss.mask_accidental_hits=false"] \
        if candidates == "sampled" else []
    s, batch = _sequence_setup(demo_prepared, demo_data, tmp_path,
                               f"sequence.candidates={candidates}",
                               f"sequence.exclude_seen={str(exclude_seen).lower()}", *extra)
    s.model.eval()  # no dropout: the loop recomputes every position on its own
    loss, _ = s.task.loss(s.module, batch)
    p = positions_of(batch, history_keys(s.model), Objective.CLM)
    catalogue = s.task._catalogue_rows(torch.arange(s.task.sampler.num_items), "cpu")
    items = s.model.encode_item(catalogue)  # [I, D]
    trained = p.trained.nonzero().tolist()
    cand = p.targets[p.trained]  # sampled: the batch's positives are the candidates
    ids = torch.arange(len(items)) if candidates == "full" else cand  # each column's item
    inputs = batch[SEQUENCE_ITEMS][:, :-1]  # [B, L] the item each position sees last
    per_position, masked = [], 0
    for row, (b, t) in enumerate(trained):
        alone = {k: v[b:b + 1].clone() for k, v in p.inputs.items()}
        for k in history_keys(s.model):  # remove every item after position t
            alone[k][:, t + 1:] = 0
        query = s.model.encode_user_positions(alone)[0, t]  # [D]
        scores = (items if candidates == "full" else items[cand]) @ query
        label = p.targets[b, t] if candidates == "full" else torch.tensor(row)
        if exclude_seen:  # the items up to position t leave, the positive's column stays
            seen = {int(i) for i in inputs[b, :t + 1] if i >= 0}
            drop = torch.tensor([int(i) in seen for i in ids]) & (torch.arange(len(ids))
                                                                  != label)
            scores = scores.masked_fill(drop, float("-inf"))
            masked += int(drop.sum())
        per_position.append(F.cross_entropy(scores[None] / s.model.temperature(), label[None]))
    assert len(per_position) == int(p.trained.sum()) > 8
    assert (masked > len(per_position)) == exclude_seen  # the mask is not empty
    expected = torch.stack(per_position).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-4)


def test_weighted_positions_use_each_targets_weight(demo_prepared, demo_data, tmp_path):
    s, batch = _sequence_setup(demo_prepared, demo_data, tmp_path, "data.weight=weight")
    assert s.task.weighted
    s.model.eval()
    batch[SEQUENCE_WEIGHTS] = torch.zeros_like(batch[SEQUENCE_WEIGHTS])
    p = positions_of(batch, history_keys(s.model), Objective.CLM)
    b, t = p.trained.nonzero()[0].tolist()
    batch[SEQUENCE_WEIGHTS][b, t + 1] = 2.0  # only one position counts
    loss, _ = s.task.loss(s.module, batch)
    catalogue = s.task._catalogue_rows(torch.arange(s.task.sampler.num_items), "cpu")
    query = s.model.encode_user_positions(p.inputs)[b, t]
    scores = s.model.encode_item(catalogue) @ query / s.model.temperature()
    expected = F.cross_entropy(scores[None], p.targets[b, t][None])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


# -- training, export and the served embedding -------------------------------------------


@pytest.mark.parametrize("mode", ["clm", "mlm"])
def test_trained_tower_serves_the_last_positions_output(demo_prepared, demo_data, tmp_path,
                                                         mode):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_prepared / "prepared", run_dir / "prepared")
    cfg = demo_config(demo_data, *(CLM if mode == "clm" else MLM), "train.epochs=2")
    out = run_plain(cfg, run_dir, log=lambda m: None)
    assert out["history"][-1]["train/loss"] < out["history"][0]["train/loss"]
    model, meta, _ = load_trained(RunDir(run_dir))
    assert meta.config.sequence.objective.value == mode
    users = read_table(RunDir(run_dir), USER)
    inputs = tower_inputs(to_tensors(table_to_numpy(users, tower_columns(users.column_names,
                                                                         USER))), USER)
    served = ExportedTower(RunDir(run_dir).exported_tower(USER))(inputs)["user_emb"]
    with torch.no_grad():
        if mode == "clm":
            last = model.encode_user_positions(inputs)[:, -1]
        else:  # a mask token after the last item: shift left, mask the last position
            shifted = {k: (torch.cat([v[:, 1:], torch.ones_like(v[:, :1])], 1)
                           if k in history_keys(model) else v) for k, v in inputs.items()}
            masked = torch.zeros_like(shifted["history"], dtype=torch.bool)
            masked[:, -1] = True
            last = model.encode_user_positions(shifted, masked)[:, -1]
    assert served.shape == (len(users), cfg.model.output_dim)
    torch.testing.assert_close(served, last, atol=1e-5, rtol=1e-5)


def test_unknown_users_and_empty_histories_embed_to_finite_vectors(demo_prepared, demo_data,
                                                                  tmp_path):
    s, _ = _sequence_setup(demo_prepared, demo_data, tmp_path)
    s.model.eval()
    spec = s.model.user_tower.input_spec()
    empty = {k: torch.zeros((2, *shape), dtype=getattr(torch, dtype))
             for k, (dtype, shape) in spec.items()}
    emb = s.model.encode_user(empty)
    assert emb.shape == (2, s.cfg.model.output_dim) and torch.isfinite(emb).all()


def test_trimming_shared_padding_leaves_the_loss_unchanged(demo_prepared, demo_data, tmp_path,
                                                          monkeypatch):
    import training.sequence as seq

    s, _ = _sequence_setup(demo_prepared, demo_data, tmp_path, "sequence.candidates=full",
                           "sequence.exclude_seen=true")
    lengths = (s.shard[SEQUENCE_ITEMS] >= 0).sum(1)
    short = lengths.argsort()[:8]  # the 8 shortest windows: most columns are padding
    batch = {k: v[short].clone() for k, v in s.shard.items()}
    width = batch[SEQUENCE_ITEMS].shape[1]
    assert int(lengths[short].max()) < width - 5  # there is padding to cut
    p = seq.trim_padding(positions_of(batch, history_keys(s.model), Objective.CLM),
                         history_keys(s.model))
    assert p.seen.shape[1] == int(lengths[short].max()) - 1  # the longest window's inputs
    s.model.eval()
    trimmed, _ = s.task.loss(s.module, batch)
    monkeypatch.setattr(seq, "trim_padding", lambda p, keys: p)
    whole, _ = s.task.loss(s.module, batch)
    assert float(trimmed.detach()) == pytest.approx(float(whole.detach()), rel=1e-5)


@pytest.mark.parametrize(("setting", "pools"), [("false", False), ("true", True),
                                               ("auto", False)])
def test_length_pools_decides_how_an_epoch_is_batched(demo_prepared, demo_data, tmp_path,
                                                      monkeypatch, setting, pools):
    import training.loop as loop

    s, _ = _sequence_setup(demo_prepared, demo_data, tmp_path,
                           f"sequence.length_pools={setting}")
    assert s.pools == pools and len(s.resolved) == 1
    if setting == "auto":  # the demo users' median history (about 30) is not short
        assert s.resolved[0].startswith("sequence.length_pools: auto -> off (median history ")
    seen = []
    monkeypatch.setattr(loop, "train_epoch", lambda module, task, batches, *a, **k: (
        seen.extend(batches), {"loss": 0.0})[1])
    monkeypatch.setattr(loop, "epoch_stats_over_ranks", lambda stats, device: stats)
    loop.train_one_epoch(s, loop.ckpt.TrainState())
    spread = np.mean([np.ptp((b[SEQUENCE_ITEMS] >= 0).sum(1).numpy()) for b in seen])
    lengths = (s.shard[SEQUENCE_ITEMS] >= 0).sum(1).numpy()
    assert len(seen) == len(lengths) // s.cfg.train.batch_size
    # pooled batches hold windows of about one length; random ones span the lengths
    assert (spread < np.ptp(lengths) / 4) == pools
