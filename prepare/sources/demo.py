"""Synthetic demo tables with planted structure a two-tower model can learn (numpy + pyarrow).

Output under ``OUT`` (the columns ``configs/demo.yaml`` reads):

* ``users/part-XXXXX.parquet``: ``user_id`` int64, ``age`` int64, ``gender`` string,
  ``country`` string, ``signup_days`` float64 (every column but ``user_id`` has nulls).
* ``items/part-00000.parquet``: ``item_id`` int64, ``category`` string, ``tags``
  list<string>, ``title`` string, ``price`` float64, ``year`` int64, ``embedding``
  list<float32> of length :data:`EMBEDDING_DIM`.
* ``interactions/part-XXXXX.parquet``: ``user_id`` int64, ``item_id`` int64,
  ``timestamp`` int64 (unix seconds), ``weight`` float32, ``impressions`` list<int64>
  (items shown beside the clicked one and not clicked); each user's rows in time order.

Planted structure: K latent topics (:data:`TOPICS`). Each item has a topic mixture
(its main topic is its ``category``; title words, tags, price, year and the "pretrained"
``embedding`` all follow the topic) and a Zipf popularity within its main topic. Each user
has a taste over topics that depends on age, gender and country and drifts over the user's
timeline. A user's interactions are generated in time order: the topic is kept from the
previous interaction with probability :data:`P_SAME_TOPIC`, else drawn from the taste;
the item is drawn from the popularity within that topic, or, with probability
:data:`P_SEQUEL`, is the "sequel" of the previous item (a fixed item of the same topic).
Interaction counts per user are log-normal, at least :data:`MIN_PER_USER`. Each
interaction also shows :data:`N_SHOWN` items drawn from the same topic's popularity; the
clicked one and repeats are left out of its ``impressions``.

Regimes (:data:`REGIMES`, ``--regime``) set the default sizes and the shape of the data,
so that defaults can be checked beyond one kind of data set:

* ``default``: 5,000 users, 2,000 items, 300,000 interactions (median 35 per user), user
  features, second-level timestamps;
* ``long``: MovieLens-like long histories: 1,000 users, 1,700 items, 100,000 interactions
  (median about 60 per user), and, as in MovieLens (one rating per user and movie), no
  user meets an item twice: a draw the user already had is drawn again (a sequel the user
  already had is replaced by a fresh draw);
* ``sparse``: e-commerce-like: 12,000 users, 3,000 items, 270,000 interactions (median
  about 17 per user), item side features only (the user table holds ``user_id`` alone), and
  day-level timestamps, so many interactions of a user tie (the split then orders them by
  file row, which is the order they happened in). Re-purchases stay (10 % of the rows), as
  in ``default`` (popular items come back: 23 % of the rows; both at ``seed=1``).

Users are generated in chunks of about ``chunk_rows`` interactions, one users file and one
interactions file per chunk, so 10^7 interactions never sit in memory at once. The output
is a function of ``(seed, chunk_rows)``, the regime and the sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

TOPICS: dict[str, tuple[str, ...]] = {
    "scifi": ("space", "robot", "galaxy", "alien", "future", "star"),
    "cooking": ("recipe", "kitchen", "pasta", "spice", "bread", "grill"),
    "jazz": ("swing", "saxophone", "blues", "groove", "trumpet", "bebop"),
    "fitness": ("yoga", "cardio", "strength", "running", "stretch", "core"),
    "travel": ("island", "journey", "mountain", "coast", "passport", "road"),
    "history": ("empire", "war", "ancient", "dynasty", "medieval", "revolution"),
    "gardening": ("garden", "seed", "flower", "soil", "orchard", "herb"),
    "finance": ("money", "invest", "market", "budget", "stock", "wealth"),
    "gaming": ("quest", "pixel", "arcade", "dragon", "level", "boss"),
    "kids": ("puppy", "rainbow", "bunny", "castle", "crayon", "balloon"),
    "crime": ("detective", "murder", "heist", "alibi", "noir", "case"),
    "science": ("atom", "cell", "climate", "brain", "quantum", "fossil"),
}
TOPIC_NAMES = tuple(TOPICS)
GENERIC_WORDS = ("the", "great", "little", "complete", "guide", "new", "best", "secret")
GLOBAL_TAGS = ("bestseller", "new", "classic", "sale")
#: Common countries, most frequent first (drawn Zipf-like); rare codes are added per run.
COUNTRIES = ("US", "IN", "BR", "GB", "DE", "FR", "JP", "MX", "CA", "ES", "IT", "KR", "AU",
             "NL", "PL", "TR", "SE", "AR", "NG", "ZA")
EMBEDDING_DIM = 16
MIN_PER_USER = 5
P_SAME_TOPIC = 0.6
P_SEQUEL = 0.2
N_SHOWN = (2, 5)  # impressions drawn per interaction, inclusive range (before dropping)
N_PHASES = 4  # taste drift is piecewise constant over this many phases of a user's timeline
START_TIME = 1_600_000_000
PART = "part-{:05d}.parquet"
TABLE_NAMES = ("users", "items", "interactions")

Log = Callable[[str], None]


@dataclass(frozen=True)
class Regime:
    """The shape of a generated data set (see the module docstring)."""

    users: int  # default sizes
    items: int
    interactions: int
    user_features: bool  # False: the user table holds user_id only
    time_step: int  # timestamps are rounded down to a multiple of this many seconds
    repeats: bool = True  # False: a user meets each item at most once


REGIMES: dict[str, Regime] = {
    "default": Regime(5000, 2000, 300_000, user_features=True, time_step=1),
    "long": Regime(1000, 1700, 100_000, user_features=True, time_step=1, repeats=False),
    "sparse": Regime(12_000, 3000, 270_000, user_features=False, time_step=86400),
}


@dataclass(frozen=True)
class World:
    """The latent structure every chunk of interactions is drawn from.

    Attributes:
        item_cdf: [K, I] cumulative P(item | topic) over item indexes.
        sequel: [I] item index of each item's sequel.
        taste: [U, K] taste logits of each user.
        drift: [U, K] change of the taste logits from the start to the end of a timeline.
        counts: [U] interactions per user.
        start: [U] int64 unix time of each user's first interaction.
    """

    item_cdf: np.ndarray
    sequel: np.ndarray
    taste: np.ndarray
    drift: np.ndarray
    counts: np.ndarray
    start: np.ndarray


def generate_demo_data(
    out: str, n_users: int | None = None, n_items: int | None = None,
    n_interactions: int | None = None, seed: int = 0, log: Log | None = None,
    chunk_rows: int = 1_000_000, regime: str = "default",
) -> dict[str, int]:
    """Write the three demo tables under ``out``.

    Args:
        out: Output folder; created if missing. Its table folders must hold no Parquet files.
        n_users: U, users (each gets at least :data:`MIN_PER_USER` interactions); default:
            the regime's.
        n_items: I, catalogue size; default: the regime's.
        n_interactions: N, total interactions (at least ``MIN_PER_USER * n_users``);
            default: the regime's.
        seed: Random seed; the same seed gives byte-identical files.
        log: Called with one progress line per chunk (``None``: silent).
        chunk_rows: Interactions per chunk (about; a user is never split).
        regime: a key of :data:`REGIMES`.

    Returns:
        Row counts per table: ``{"users": U, "items": I, "interactions": N}``.

    Raises:
        ValueError: sizes out of range, or an output table folder already holds Parquet files.
    """
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r} is not one of {sorted(REGIMES)}")
    shape = REGIMES[regime]
    n_users = shape.users if n_users is None else n_users
    n_items = shape.items if n_items is None else n_items
    n_interactions = shape.interactions if n_interactions is None else n_interactions
    _check_sizes(n_users, n_items, n_interactions, chunk_rows)
    out_dir = Path(out)
    _check_output(out_dir)
    rng = np.random.default_rng([seed, 0])
    items, mixture = make_items(rng, n_items)
    users, taste = make_users(rng, n_users)
    if not shape.user_features:
        users = users.select(["user_id"])
    world = make_world(rng, mixture, taste, n_interactions)
    if not shape.repeats and world.counts.max() > n_items:
        raise ValueError(
            f"regime {regime!r} has no repeats, but a user draws {world.counts.max()} "
            f"interactions from {n_items} items; raise n_items or lower n_interactions")
    _write(items, out_dir / "items", 0)
    bounds = chunk_bounds(world.counts, chunk_rows)
    t0 = time.perf_counter()
    for index, (lo, hi) in enumerate(bounds):
        inter = make_interactions(np.random.default_rng([seed, 1, index]), world, lo, hi,
                                  shape.time_step, shape.repeats)
        _write(users.slice(lo, hi - lo), out_dir / "users", index)
        _write(inter, out_dir / "interactions", index)
        if log is not None:
            log(f"[demo] chunk {index + 1}/{len(bounds)}: users {lo}..{hi - 1}, "
                f"{inter.num_rows:,} interactions ({time.perf_counter() - t0:.1f}s)")
    return {"users": n_users, "items": n_items, "interactions": n_interactions}


# ----------------------------------------------------------------------------- items


def make_items(rng: np.random.Generator, n_items: int) -> tuple[pa.Table, np.ndarray]:
    """The item table and each item's topic mixture.

    Returns:
        The table (ids ``1..I``) and the mixture, [I, K] rows summing to 1.
    """
    k = len(TOPICS)
    main = rng.integers(0, k, n_items)
    mixture = 0.75 * np.eye(k)[main] + 0.25 * rng.dirichlet(np.full(k, 0.3), n_items)
    second = np.argmax(mixture - np.eye(k)[main], axis=1)
    topic_price = rng.uniform(1.0, 4.5, k)
    topic_year = rng.uniform(1965, 2015, k)
    topic_vectors = rng.normal(0.0, 1.0, (k, EMBEDDING_DIM))
    price = np.round(np.exp(topic_price[main] + 0.5 * rng.normal(size=n_items)), 2)
    year = np.clip(np.round(topic_year[main] + rng.normal(0, 6, n_items)), 1950, 2024)
    vectors = mixture @ topic_vectors + 0.3 * rng.normal(size=(n_items, EMBEDDING_DIM))
    table = pa.table({
        "item_id": np.arange(1, n_items + 1, dtype=np.int64),
        "category": _categories(rng, main),
        "tags": _tags(rng, main),
        "title": _titles(rng, main, second),
        "price": pa.array(price, mask=rng.random(n_items) < 0.03),
        "year": year.astype(np.int64),
        "embedding": _vector_column(vectors, rng.random(n_items) < 0.01),
    })
    return table, mixture


def _categories(rng: np.random.Generator, main: np.ndarray) -> pa.Array:
    """Main topic name; 2% null, 0.5% a one-off category."""
    names = np.array(TOPIC_NAMES, dtype=object)[main]
    one_off = np.flatnonzero(rng.random(len(main)) < 0.005)
    names[one_off] = [f"special-{i + 1}" for i in one_off]
    return pa.array(names, pa.string(), mask=rng.random(len(main)) < 0.02)


def _tags(rng: np.random.Generator, main: np.ndarray) -> pa.Array:
    """1-4 tags, mostly words of the main topic; some lists empty, 1% null."""
    n_tags = rng.integers(0, 5, len(main))
    words = rng.integers(0, 6, (len(main), 4))
    is_global = rng.random((len(main), 4)) < 0.2
    glob = rng.integers(0, len(GLOBAL_TAGS), (len(main), 4))
    rows = [
        [GLOBAL_TAGS[glob[i, j]] if is_global[i, j] else TOPICS[TOPIC_NAMES[t]][words[i, j]]
         for j in range(n_tags[i])]
        for i, t in enumerate(main)
    ]
    return pa.array(rows, pa.list_(pa.string()), mask=rng.random(len(main)) < 0.01)


def _titles(rng: np.random.Generator, main: np.ndarray, second: np.ndarray) -> pa.Array:
    """A generic word, two main-topic words, sometimes a second-topic word or a rare token."""
    n = len(main)
    generic = rng.integers(0, len(GENERIC_WORDS), n)
    words = rng.integers(0, 6, (n, 3))
    add_second, add_rare = rng.random(n) < 0.3, rng.random(n) < 0.05
    titles = []
    for i in range(n):
        own = TOPICS[TOPIC_NAMES[main[i]]]
        parts = [GENERIC_WORDS[generic[i]], own[words[i, 0]], own[words[i, 1]]]
        if add_second[i]:
            parts.append(TOPICS[TOPIC_NAMES[second[i]]][words[i, 2]])
        if add_rare[i]:
            parts.append(f"vol{i + 1}")
        titles.append(" ".join(parts).capitalize())
    return pa.array(titles, pa.string())


def _vector_column(vectors: np.ndarray, null: np.ndarray) -> pa.Array:
    """[I, D] floats -> list<float32> with D values per row (null rows where ``null``)."""
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    values = pa.array(vectors.astype(np.float32).reshape(-1))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(null))


# ----------------------------------------------------------------------------- users


def make_users(rng: np.random.Generator, n_users: int) -> tuple[pa.Table, np.ndarray]:
    """The user table and each user's taste logits, which depend on age, gender, country.

    Returns:
        The table (ids ``1..U``) and the taste logits, [U, K].
    """
    k = len(TOPICS)
    age = np.clip(np.round(rng.normal(38, 13, n_users)), 16, 80).astype(np.int64)
    sex = rng.choice(3, n_users, p=[0.49, 0.49, 0.02])
    region = _zipf(rng, len(COUNTRIES), n_users, 1.2)
    country = np.array(COUNTRIES, dtype=object)[region]
    rare = np.flatnonzero(rng.random(n_users) < 0.01)
    country[rare] = [f"R{c:03d}" for c in rng.integers(0, max(20, n_users // 200), len(rare))]
    age_z = ((age - 38.0) / 13.0)[:, None]
    taste = (age_z * rng.normal(0, 1.0, k) + rng.normal(0, 1.0, (len(COUNTRIES), k))[region]
             + 0.5 * rng.normal(0, 1.0, (3, k))[sex]
             + rng.normal(0, 1.0, (n_users, k)))
    signup = np.round(rng.lognormal(5.0, 1.0, n_users), 1)
    table = pa.table({
        "user_id": np.arange(1, n_users + 1, dtype=np.int64),
        "age": pa.array(age, mask=rng.random(n_users) < 0.04),
        "gender": pa.array(np.array(["F", "M", "X"], dtype=object)[sex], pa.string(),
                           mask=rng.random(n_users) < 0.03),
        "country": pa.array(country, pa.string(), mask=rng.random(n_users) < 0.03),
        "signup_days": pa.array(signup, mask=rng.random(n_users) < 0.05),
    })
    return table, 1.5 * taste


def _zipf(rng: np.random.Generator, n_values: int, size: int, exponent: float) -> np.ndarray:
    """[size] draws of 0..n_values-1 with P(r) proportional to (r + 1) ** -exponent."""
    p = (np.arange(n_values) + 1.0) ** -exponent
    return rng.choice(n_values, size, p=p / p.sum())


# ----------------------------------------------------------------------------- world


def make_world(rng: np.random.Generator, mixture: np.ndarray, taste: np.ndarray,
               n_interactions: int) -> World:
    """Item popularity and sequels, per-user drift, counts and start times."""
    n_items, k = mixture.shape
    n_users = len(taste)
    main = np.argmax(mixture, axis=1)
    rank = np.empty(n_items)
    sequel = np.arange(n_items)
    for topic in range(k):
        members = rng.permutation(np.flatnonzero(main == topic))
        rank[members] = np.arange(len(members))
        sequel[members] = np.roll(members, -1)
    weights = mixture.T * (rank + 1.0) ** -0.9  # [K, I]
    return World(
        item_cdf=_cdf(weights / weights.sum(axis=1, keepdims=True)),
        sequel=sequel,
        taste=taste,
        drift=rng.normal(0.0, 1.5, (n_users, k)),
        counts=interaction_counts(rng, n_users, n_interactions),
        start=START_TIME + rng.integers(0, 365 * 86400, n_users),
    )


def interaction_counts(rng: np.random.Generator, n_users: int, total: int) -> np.ndarray:
    """[U] log-normal counts, each >= MIN_PER_USER, summing exactly to ``total``."""
    share = rng.lognormal(0.0, 1.0, n_users)
    extra = (total - MIN_PER_USER * n_users) * share / share.sum()
    counts = MIN_PER_USER + np.floor(extra).astype(np.int64)
    short = total - counts.sum()
    counts[np.argsort(extra - np.floor(extra), kind="stable")[::-1][:short]] += 1
    return counts


def chunk_bounds(counts: np.ndarray, chunk_rows: int) -> list[tuple[int, int]]:
    """User ranges ``[lo, hi)`` of about ``chunk_rows`` interactions each."""
    cum = np.cumsum(counts)
    cuts = np.searchsorted(cum, np.arange(chunk_rows, cum[-1], chunk_rows), side="left") + 1
    edges = np.unique(np.r_[0, cuts, len(counts)])
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


# ----------------------------------------------------------------------------- interactions


def make_interactions(rng: np.random.Generator, world: World, lo: int, hi: int,
                      time_step: int = 1, repeats: bool = True) -> pa.Table:
    """The interactions of users ``lo..hi-1``, each user's rows in time order.

    Timestamps are rounded down to a multiple of ``time_step`` seconds (86400: day-level,
    with ties inside a day; the rows stay in the order they happened). ``repeats=False``:
    no user meets an item twice (:func:`_without_repeats`; each user's count must be at
    most the catalogue size).
    """
    counts = world.counts[lo:hi]
    n = int(counts.sum())
    user = np.repeat(np.arange(hi - lo), counts)  # [n] user index within the chunk
    first = np.repeat(np.cumsum(counts) - counts, counts)  # [n] row of the user's first row
    pos = np.arange(n) - first
    phase = pos * N_PHASES // counts[user]
    topic_cdf = _taste_cdf(world.taste[lo:hi], world.drift[lo:hi])  # [(hi-lo) * P, K]
    fresh = _sample_rows(topic_cdf, user * N_PHASES + phase, rng.random(n))
    topics = fresh[_last_fresh(rng.random(n) < P_SAME_TOPIC, pos)]
    items = _sample_rows(world.item_cdf, topics, rng.random(n))
    follow = (rng.random(n) < P_SEQUEL) & (pos > 0)
    items = _follow_sequels(items, world.sequel, follow)
    if not repeats:
        items = _without_repeats(rng, world, items, user, topics, follow)
    gap = 1 + np.where(rng.random(n) < 0.7, rng.exponential(600.0, n),
                       rng.exponential(2 * 86400.0, n)).astype(np.int64)
    gap[pos == 0] = 0
    elapsed = np.cumsum(gap)
    weight = (1 + rng.poisson(0.3, n)).astype(np.float32)
    timestamp = world.start[lo:hi][user] + elapsed - elapsed[first]
    return pa.table({
        "user_id": (user + lo + 1).astype(np.int64),
        "item_id": (items + 1).astype(np.int64),
        "timestamp": timestamp - timestamp % time_step,
        "weight": weight,
        "impressions": _impressions(rng, world.item_cdf, topics, items),
    })


def _impressions(rng: np.random.Generator, item_cdf: np.ndarray, topics: np.ndarray,
                 items: np.ndarray) -> pa.Array:
    """Items shown beside each click: popular items of its topic, not the clicked one.

    Args:
        rng: drawn from after every other column, so those stay as before.
        item_cdf: [K, I] cumulative P(item | topic).
        topics: [N] topic of each interaction.
        items: [N] clicked item index of each interaction.

    Returns:
        [N] list<int64> item ids (``index + 1``), at most ``N_SHOWN[1]`` per row, no repeats.
    """
    n, width = len(items), N_SHOWN[1]
    shown = _sample_rows(item_cdf, np.repeat(topics, width), rng.random(n * width))
    shown = shown.reshape(n, width)
    count = rng.integers(N_SHOWN[0], width + 1, n)
    keep = (np.arange(width)[None, :] < count[:, None]) & (shown != items[:, None])
    for j in range(1, width):  # drop repeats of an earlier draw of the same row
        keep[:, j] &= (shown[:, j:j + 1] != shown[:, :j]).all(axis=1)
    offsets = np.r_[0, np.cumsum(keep.sum(axis=1))].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(shown[keep] + 1, pa.int64()))


def _taste_cdf(taste: np.ndarray, drift: np.ndarray) -> np.ndarray:
    """[U, K] logits and drift -> [U * P, K] cumulative topic probabilities per phase."""
    shift = (np.arange(N_PHASES) + 0.5) / N_PHASES - 0.5  # [P], -0.375 .. 0.375
    logits = taste[:, None, :] + shift[None, :, None] * drift[:, None, :]  # [U, P, K]
    logits -= logits.max(axis=-1, keepdims=True)
    probs = np.exp(logits)
    return _cdf((probs / probs.sum(axis=-1, keepdims=True)).reshape(-1, taste.shape[1]))


def _cdf(probs: np.ndarray) -> np.ndarray:
    """[R, C] probabilities -> [R, C] cumulative sums whose last column is exactly 1."""
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    return cdf


def _sample_rows(cdf: np.ndarray, rows: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Draw one column per entry of ``rows`` from the distributions ``cdf[rows]``.

    Args:
        cdf: [R, C] cumulative probabilities, last column 1.
        rows: [N] row of each draw.
        uniform: [N] uniforms in [0, 1).

    Returns:
        [N] int64 columns in ``0..C-1``.
    """
    n_rows, n_cols = cdf.shape
    # Row r lives in [r, r + 1], so one sorted search serves every row at once.
    flat = (cdf + np.arange(n_rows)[:, None]).reshape(-1)
    found = np.searchsorted(flat, rows + uniform, side="right") - rows * n_cols
    return np.minimum(found, n_cols - 1)


def _last_fresh(keep: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """[N] row whose draw each row reuses: itself, or the latest earlier row not kept."""
    index = np.arange(len(pos))
    return np.maximum.accumulate(np.where(keep & (pos > 0), 0, index))


def _follow_sequels(items: np.ndarray, sequel: np.ndarray, follow: np.ndarray) -> np.ndarray:
    """Replace ``items[i]`` by the sequel of ``items[i - 1]`` where ``follow`` (chains too)."""
    index = np.arange(len(items))
    depth = index - np.maximum.accumulate(np.where(follow, 0, index))
    items = items.copy()
    for step in range(1, int(depth.max(initial=0)) + 1):
        rows = np.flatnonzero(depth == step)  # their predecessors are already final
        items[rows] = sequel[items[rows - 1]]
    return items


def _repeated(user: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """[N] bool: the row's item already occurs at an earlier row of the same user."""
    key = user.astype(np.int64) * n_items + items
    order = np.argsort(key, kind="stable")  # equal keys stay in row order
    same = key[order[1:]] == key[order[:-1]]
    repeated = np.zeros(len(items), dtype=bool)
    repeated[order[1:][same]] = True
    return repeated


def _without_repeats(rng: np.random.Generator, world: World, items: np.ndarray,
                     user: np.ndarray, topics: np.ndarray, follow: np.ndarray,
                     rounds: int = 20) -> np.ndarray:
    """Redraw every repeated (user, item) row until each user meets an item once.

    A repeated row is drawn again from its topic's popularity (a repeated sequel stops
    following and is drawn fresh), and sequels follow the new draws, for up to ``rounds``
    rounds; the few repeats left (a user who has had most of a topic) take an item the
    user never meets, drawn from the topic's popularity or, the topic spent, uniformly.

    Args:
        rng: the chunk's generator (drawn from only when a repeat is found).
        world: popularity per topic and sequels.
        items: [N] item index per row (sequels followed); not modified.
        user: [N] user index within the chunk, rows grouped by user in time order.
        topics: [N] topic of each row.
        follow: [N] bool, the row was drawn as its predecessor's sequel; not modified.
        rounds: redraw rounds before the remaining repeats are placed one by one.

    Returns:
        [N] item indexes, no (user, item) pair twice.
    """
    n_items = world.item_cdf.shape[1]
    items, follow = items.copy(), follow.copy()
    for _ in range(rounds):
        repeated = _repeated(user, items, n_items)
        if not repeated.any():
            return items
        rows = np.flatnonzero(repeated)
        follow[rows] = False
        items[rows] = _sample_rows(world.item_cdf, topics[rows], rng.random(len(rows)))
        items = _follow_sequels(items, world.sequel, follow)
    rows = np.flatnonzero(_repeated(user, items, n_items))
    if len(rows):
        first = np.searchsorted(user, user[rows], side="left")
        last = np.searchsorted(user, user[rows], side="right")
        popularity = np.diff(world.item_cdf, axis=1, prepend=0.0)  # [K, I]
        for row, lo, hi in zip(rows, first, last, strict=True):
            taken = np.zeros(n_items, dtype=bool)
            taken[items[lo:hi]] = True
            weights = np.where(taken, 0.0, popularity[topics[row]])
            if weights.sum() <= 0:
                weights = (~taken).astype(np.float64)
            items[row] = rng.choice(n_items, p=weights / weights.sum())
    return items


# ----------------------------------------------------------------------------- io


def _check_sizes(n_users: int, n_items: int, n_interactions: int, chunk_rows: int) -> None:
    if n_users < 1 or n_items < 1 or chunk_rows < 1:
        raise ValueError(f"n_users={n_users}, n_items={n_items} and chunk_rows={chunk_rows} "
                         "must all be >= 1")
    if n_interactions < MIN_PER_USER * n_users:
        raise ValueError(f"n_interactions={n_interactions} must be >= {MIN_PER_USER} * "
                         f"n_users={MIN_PER_USER * n_users} (every user gets {MIN_PER_USER})")


def _check_output(out_dir: Path) -> None:
    """Refuse table folders that already hold Parquet files (readers would take them all)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {str(out_dir)!r} exists and is not a folder")
    found = sorted(str(p) for name in TABLE_NAMES for p in (out_dir / name).glob("*.parquet"))
    if found:
        raise ValueError(f"output {str(out_dir)!r} already holds Parquet files "
                         f"({', '.join(found[:3])}); use an empty folder")


def _write(table: pa.Table, folder: Path, index: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / PART.format(index))
