"""The demo data generator: determinism, schema, chunking, nulls and the planted structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.config import load_config
from pipeline.splits import TEST, TRAIN
from prepare import tables
from prepare.sources.demo import (
    EMBEDDING_DIM,
    MIN_PER_USER,
    REGIMES,
    World,
    _follow_sequels,
    _repeated,
    _sample_rows,
    _without_repeats,
    chunk_bounds,
    generate_demo_data,
    interaction_counts,
)
from prepare.split import leave_last_out

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"n_users": 2000, "n_items": 500, "n_interactions": 60_000}
TABLES = ("users", "items", "interactions")


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """2,000 users, 500 items, 60,000 interactions in chunks of ~15,000 rows."""
    out = tmp_path_factory.mktemp("demo") / "small"
    generate_demo_data(str(out), **SMALL, seed=0, chunk_rows=15_000)
    return out


def read(root: Path, name: str) -> pa.Table:
    return pads.dataset(root / name).to_table()


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    sizes = {"n_users": 200, "n_items": 100, "n_interactions": 3000, "chunk_rows": 1000}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_demo_data(str(tmp_path / name), **sizes, seed=seed)
    first, again, other = (file_bytes(tmp_path / n) for n in "abc")
    assert len(first) == 2 * 3 + 1  # 3 users + 3 interactions files, 1 items file
    assert first == again
    for name in TABLES:
        assert not read(tmp_path / "a", name).equals(read(tmp_path / "c", name))
    assert first.keys() == other.keys() and first != other


def test_schema_matches_demo_config(small):
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    for name, columns in tables.required_columns(cfg).items():
        tables.validate_table(tables.resolve_files(name, str(small / name)), columns)
    items = read(small, "items")
    assert items.schema.field("embedding").type == pa.list_(pa.float32())
    assert items.schema.field("tags").type == pa.list_(pa.string())
    lengths = set(items["embedding"].drop_null().combine_chunks().value_lengths().to_pylist())
    assert lengths == {EMBEDDING_DIM}
    assert read(small, "interactions").schema == pa.schema([
        ("user_id", pa.int64()), ("item_id", pa.int64()),
        ("timestamp", pa.int64()), ("weight", pa.float32()),
        ("impressions", pa.list_(pa.int64())),
    ])


def test_impressions_are_other_catalogue_items_of_the_same_topic(small):
    inter, items = read(small, "interactions"), read(small, "items")
    shown = inter["impressions"].combine_chunks()
    lengths = shown.value_lengths().to_numpy()
    ids = shown.flatten().to_numpy()
    clicked = np.repeat(inter["item_id"].to_numpy(), lengths)  # [K] the row's click
    assert shown.null_count == 0 and lengths.max() <= 5 and 2 < lengths.mean() < 4
    assert np.isin(ids, items["item_id"].to_numpy()).all()
    assert (ids != clicked).all()
    row = np.repeat(np.arange(len(lengths)), lengths)
    assert len(np.unique(row * 1000 + ids)) == len(ids)  # no repeats within a row
    # "near the clicked one": often the click's category (its topic), far above chance 1/12
    category = np.asarray(items["category"].fill_null("?").to_pylist())
    assert (category[ids - 1] == category[clicked - 1]).mean() > 0.4  # seed 0: 0.536


def test_chunks_counts_and_time_order(small):
    # 60,000 rows in chunks of ~15,000: 4 users files and 4 interactions files
    assert len(list((small / "interactions").glob("*.parquet"))) == 4
    assert len(list((small / "users").glob("*.parquet"))) == 4
    users, inter = read(small, "users"), read(small, "interactions")
    assert users["user_id"].to_numpy().tolist() == list(range(1, 2001))
    assert read(small, "items")["item_id"].to_numpy().tolist() == list(range(1, 501))
    uid, ts = inter["user_id"].to_numpy(), inter["timestamp"].to_numpy()
    item = inter["item_id"].to_numpy()
    assert inter.num_rows == 60_000 and item.min() >= 1 and item.max() <= 500
    per_user = np.bincount(uid, minlength=2001)[1:]
    assert per_user.min() == MIN_PER_USER
    assert per_user.max() > 5 * np.median(per_user)  # skewed
    same_user = uid[1:] == uid[:-1]
    assert np.all(uid[1:] >= uid[:-1]) and np.all(ts[1:][same_user] > ts[:-1][same_user])


def test_nulls_and_rare_values(small):
    users, items = read(small, "users"), read(small, "items")
    for table, column in [(users, "age"), (users, "gender"), (users, "country"),
                          (users, "signup_days"), (items, "category"), (items, "tags"),
                          (items, "price"), (items, "embedding")]:
        assert 0 < table[column].null_count < 0.1 * table.num_rows, column
    countries = users["country"].drop_null().value_counts().to_pylist()
    rare = [c["values"] for c in countries if c["counts"] < 5]  # OOV at min_count 5
    assert len(rare) >= 5
    categories = items["category"].drop_null().value_counts().to_pylist()
    assert any(c["counts"] == 1 for c in categories)
    titles = " ".join(items["title"].to_pylist()).lower().split()
    words, counts = np.unique(titles, return_counts=True)
    assert (counts == 1).sum() >= 5  # tokens under min_count 2


def test_sample_rows_hand_worked():
    cdf = np.array([[0.5, 1.0], [0.0, 1.0]])
    # row 0: u=0.2 < 0.5 -> col 0, u=0.7 -> col 1; row 1: P(col 0) = 0 -> col 1
    found = _sample_rows(cdf, np.array([0, 0, 1]), np.array([0.2, 0.7, 0.1]))
    assert found.tolist() == [0, 1, 1]


def test_counts_and_chunk_bounds():
    counts = interaction_counts(np.random.default_rng(0), 100, 2345)
    assert counts.sum() == 2345 and counts.min() >= MIN_PER_USER
    # cumulative [5, 10, 15, 20]; cuts once 8 and 16 rows are reached: after users 2 and 4
    assert chunk_bounds(np.array([5, 5, 5, 5]), 8) == [(0, 2), (2, 4)]
    assert chunk_bounds(np.array([5, 5, 5, 5]), 100) == [(0, 4)]


def test_bad_sizes_and_non_empty_output(tmp_path):
    with pytest.raises(ValueError, match="n_interactions=40 must be >= 5"):
        generate_demo_data(str(tmp_path / "a"), n_users=10, n_items=5, n_interactions=40)
    generate_demo_data(str(tmp_path / "b"), n_users=10, n_items=5, n_interactions=50)
    with pytest.raises(ValueError, match="already holds Parquet files"):
        generate_demo_data(str(tmp_path / "b"), n_users=10, n_items=5, n_interactions=50)


def hit_rate_at_10(scores: np.ndarray, seen: np.ndarray, targets: np.ndarray) -> float:
    """HR@10 over [B, I] scores, seen items masked, ties counted for the target."""
    scores = np.where(seen, -np.inf, scores)
    target_score = scores[np.arange(len(targets)), targets]
    return float(((scores > target_score[:, None]).sum(axis=1) < 10).mean())


def test_planted_structure_beats_popularity(small):
    inter = read(small, "interactions")
    n_items = SMALL["n_items"]
    split = leave_last_out(inter["user_id"].to_numpy(), inter["timestamp"].to_numpy(), 3)
    items = inter["item_id"].to_numpy()[split.order] - 1  # item index per sorted row
    train = split.split == TRAIN
    pairs = np.flatnonzero(train & (np.arange(len(items)) > split.group_start))
    follows = np.bincount(items[pairs - 1] * n_items + items[pairs], minlength=n_items**2)
    popularity = np.bincount(items[train], minlength=n_items) / train.sum()
    test = np.flatnonzero(split.split == TEST)
    seen = np.zeros((len(test), n_items), dtype=bool)  # train + validation items of each user
    owner = np.repeat(np.arange(len(test)), test - split.group_start[test])
    seen[owner, items[np.concatenate([np.arange(split.group_start[p], p) for p in test])]] = True
    targets = items[test]
    most_popular = hit_rate_at_10(np.tile(popularity, (len(test), 1)), seen, targets)
    # item-to-item: what followed the user's last item (the validation target) in training
    next_item = follows.reshape(n_items, n_items)[items[test - 1]] + popularity
    co_occurrence = hit_rate_at_10(next_item, seen, targets)
    assert len(test) == 2000
    assert 0.04 < most_popular < 0.15  # seed 0: 0.0775
    assert co_occurrence > 0.2  # seed 0: 0.2615
    assert co_occurrence > 1.5 * most_popular


def test_user_features_carry_taste(small):
    users, items, inter = read(small, "users"), read(small, "items"), read(small, "interactions")
    age = users["age"].to_numpy(zero_copy_only=False)[inter["user_id"].to_numpy() - 1]
    category = np.asarray(items["category"].fill_null("?").to_pylist())
    seen = category[inter["item_id"].to_numpy() - 1]
    names = np.unique(category)

    def share(rows: np.ndarray) -> np.ndarray:
        counts = np.array([(seen[rows] == name).sum() for name in names], dtype=float)
        return counts / counts.sum()

    uid = inter["user_id"].to_numpy()
    young_vs_old = 0.5 * np.abs(share(age < 30) - share(age > 50)).sum()
    odd_vs_even = 0.5 * np.abs(share(uid % 2 == 0) - share(uid % 2 == 1)).sum()
    # total variation between category mixes: seed 0 gives 0.58 by age, 0.04 by id parity
    assert young_vs_old > 0.3 and odd_vs_even < 0.1


@pytest.mark.parametrize(("regime", "median", "user_columns"), [
    ("long", (50, 75), {"user_id", "age", "gender", "country", "signup_days"}),
    ("sparse", (15, 20), {"user_id"}),
])
def test_regimes_shape_histories_time_and_user_features(tmp_path, regime, median,
                                                        user_columns):
    counts = generate_demo_data(str(tmp_path / regime), regime=regime, seed=0)
    shape = REGIMES[regime]
    assert counts == {"users": shape.users, "items": shape.items,
                      "interactions": shape.interactions}
    inter = read(tmp_path / regime, "interactions")
    per_user = np.bincount(inter["user_id"].to_numpy())[1:]
    assert median[0] <= np.median(per_user) <= median[1]
    assert set(read(tmp_path / regime, "users").column_names) == user_columns
    ts, users = inter["timestamp"].to_numpy(), inter["user_id"].to_numpy()
    assert (ts % shape.time_step == 0).all()
    same_user = users[1:] == users[:-1]
    ties = (ts[1:] == ts[:-1])[same_user].mean()
    assert ties > 0.5 if regime == "sparse" else ties < 0.01
    assert (np.diff(ts)[same_user] >= 0).all()  # still in time order per user
    pairs = users.astype(np.int64) * (shape.items + 1) + inter["item_id"].to_numpy()
    repeated = 1 - len(np.unique(pairs)) / len(pairs)
    # long: MovieLens-like, each (user, item) once; sparse keeps re-purchases (seed 0: 10 %)
    assert repeated == 0 if regime == "long" else 0.05 < repeated < 0.2
    with pytest.raises(ValueError, match="regime 'huge' is not one of"):
        generate_demo_data(str(tmp_path / "x"), regime="huge")


def test_without_repeats_spends_a_whole_catalogue():
    """Users who meet every item (one topic spent halfway) each get a permutation."""
    rng = np.random.default_rng(0)
    n_items, n_users = 12, 3
    popularity = np.r_[np.full(6, 0.3), np.full(6, 0.0)] / 1.8  # topic 0 = items 0..5
    item_cdf = np.cumsum(np.stack([popularity, popularity[::-1]]), axis=1)
    item_cdf[:, -1] = 1.0
    sequel = np.r_[np.roll(np.arange(6), -1), 6 + np.roll(np.arange(6), -1)]
    world = World(item_cdf=item_cdf, sequel=sequel, taste=np.zeros((n_users, 2)),
                  drift=np.zeros((n_users, 2)), counts=np.full(n_users, n_items),
                  start=np.zeros(n_users, dtype=np.int64))
    user = np.repeat(np.arange(n_users), n_items)
    topics = np.zeros(n_users * n_items, dtype=np.int64)  # topic 0 runs out after 6 items
    items = _sample_rows(item_cdf, topics, rng.random(len(topics)))
    follow = (rng.random(len(items)) < 0.5) & (np.arange(len(items)) % n_items > 0)
    items = _follow_sequels(items, sequel, follow)
    given_items, given_follow = items.copy(), follow.copy()
    out = _without_repeats(rng, world, items, user, topics, follow)
    for u in range(n_users):
        assert sorted(out[user == u]) == list(range(n_items))
    assert (items == given_items).all() and (follow == given_follow).all()  # not modified
    first = np.arange(len(items)) % n_items == 0  # the earliest row is never a repeat
    assert (out[first] == items[first]).all() and _repeated(user, items, n_items).sum() > 9


def test_no_repeat_regime_refuses_a_user_with_more_rows_than_items(tmp_path):
    with pytest.raises(ValueError, match="has no repeats, but a user draws .* from 20 items"):
        generate_demo_data(str(tmp_path / "x"), regime="long", n_users=10, n_items=20,
                           n_interactions=2000, seed=0)
