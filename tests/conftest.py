"""Shared fixtures: one Ray per test session, the MovieLens data, tiny tables."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def need_data(path: Path) -> Path:
    """Return ``path``; fail loudly in CI when it is missing, skip elsewhere."""
    if path.exists():
        return path
    message = f"test data missing: {path} (see ../shared/EVALUATION.md)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    """The raw MovieLens-100K folder from ../shared/data (never copied into the project)."""
    return need_data(SHARED_DATA / "ml-100k")


@pytest.fixture(scope="session")
def ray_session():
    """Start Ray once for the whole session (2 CPUs, no dashboard) and shut it down."""
    import ray

    from serve_app import environment

    # the jobs' defaults, and Serve as shipped (HAProxy ingress) with this session's own
    # HAProxy files and ports
    for name, value in {**environment.RAY_DEFAULTS, **environment.LOCAL_DEFAULTS,
                        **environment.isolated_env(environment.Ingress.HAPROXY)}.items():
        os.environ.setdefault(name, value)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=1 << 30, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def write_tiny_tables(root: Path) -> Path:
    """Three hand-made tables whose split and encodings are worked out in the tests.

    Interactions (user, item, timestamp) in file order, two files:
      u1: (10,5) (11,1) (12,3) (13,3)  -> sorted 11, 12, 13, 10 (12 before 13: row order)
      u2: (10,1) (12,2) (14,3)
      u3: (11,7) (11,7) (13,7) (99,8)  -> 99 is not in the catalogue and is dropped
    """
    (root / "interactions").mkdir(parents=True)
    inter = pa.table({
        "user_id": [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3],
        "item_id": [10, 11, 12, 13, 10, 12, 14, 11, 11, 13, 99],
        "timestamp": [5, 1, 3, 3, 1, 2, 3, 7, 7, 7, 8],
        "weight": [1.0] * 11,
    })
    pq.write_table(inter.slice(0, 6), root / "interactions" / "part-0.parquet")
    pq.write_table(inter.slice(6), root / "interactions" / "part-1.parquet")
    pq.write_table(pa.table({
        "user_id": [1, 2, 4], "age": [20, None, 40], "gender": ["F", "M", None],
    }), root / "users.parquet")
    pq.write_table(pa.table({
        "item_id": [10, 11, 12, 13, 14],
        "category": ["x", "y", "x", None, "z"],
        "tags": [["a", "b"], ["b"], [], None, ["c", "a", "d"]],
        "title": ["The Big Cat", "big dog", "A cat!", "dog days", "Nothing"],
        "price": [1.0, 2.0, None, 4.0, 5.0],
        "embedding": pa.array([[0.5, 1.0], [1.0, 0.0], [0.0, 0.0], None, [2.0, 2.0]],
                              pa.list_(pa.float32())),
    }), root / "items.parquet")
    return root


TINY_CONFIG = {
    "data": {"interactions": "interactions", "users": "users.parquet",
             "items": "items.parquet", "weight": "weight"},
    "features": {
        "user": [
            {"name": "user_id", "type": "categorical"},
            {"name": "age", "type": "numeric", "transform": "bucketize", "boundaries": [30]},
            {"name": "gender", "type": "categorical"},
            {"name": "history", "type": "sequence", "max_length": 3,
             "item_features": ["category"]},
        ],
        "item": [
            {"name": "item_id", "type": "categorical"},
            {"name": "category", "type": "categorical"},
            {"name": "tags", "type": "multi_hot", "max_length": 2},
            {"name": "title", "type": "text", "max_tokens": 3, "min_count": 1},
            {"name": "price", "type": "numeric", "transform": "log"},
            {"name": "embedding", "type": "dense_vector", "dim": 2},
        ],
    },
    # u3's (11, 7) is there twice on purpose (ties broken by row): keep both
    "prepare": {"min_user_interactions": 3, "duplicates": "keep"},
}


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """The tiny tables written under a temporary folder."""
    return write_tiny_tables(tmp_path / "tiny")


# Small enough for a 2-core machine, big enough that every split and feature is populated.
DEMO_SIZES = {"n_users": 300, "n_items": 120, "n_interactions": 9000}
TINY = ROOT / "configs" / "tiny.yaml"  # the interaction mode, small

# The sequence mode of configs/demo.yaml, small (on configs/tiny.yaml).
SEQUENCE_OVERRIDES = (
    "model.user.type=transformer", "model.user.transformer.causal=true",
    "model.user.transformer.dim=16", "model.user.transformer.num_layers=1",
    "sequence.objective=clm", "train.batch_size=16",
)


def demo_config(data_root: Path, *overrides: str):
    """configs/tiny.yaml pointed at ``data_root``, with ``overrides``."""
    from pipeline.config import load_config

    return load_config(TINY, [f"data.root={data_root}", *overrides])


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """Tiny generated demo tables (once per session)."""
    from prepare.sources.demo import generate_demo_data

    root = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_data(str(root), seed=3, **DEMO_SIZES)
    return root


@pytest.fixture(scope="session")
def demo_prepared(ray_session, demo_data, tmp_path_factory) -> Path:
    """A RUN_DIR with ``prepared/`` from the real prepare step (copy it before writing)."""
    from prepare.run import run_prepare

    run_dir = tmp_path_factory.mktemp("demo_run")
    run_prepare(demo_config(demo_data), run_dir, log=lambda m: None)
    return run_dir


@pytest.fixture(scope="session")
def demo_trained(demo_prepared, demo_data, tmp_path_factory) -> Path:
    """A RUN_DIR with a model (plain-process training) and a Flat index (Ray Data embeds)."""
    import shutil

    from jobs import build_index
    from training.loop import run_plain

    run_dir = tmp_path_factory.mktemp("demo_trained")
    shutil.copytree(demo_prepared / "prepared", run_dir / "prepared")
    cfg = demo_config(demo_data)
    run_plain(cfg, run_dir, log=lambda m: None)
    build_index.run(demo_config(demo_data, "index.local_max_rows=0"), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def refit_runs(tmp_path_factory):
    """(demo data, {refit: RUN_DIR with prepared/}), prepared in this process."""
    from prepare.run import run_prepare
    from prepare.sources.demo import generate_demo_data

    root = tmp_path_factory.mktemp("refit")
    generate_demo_data(str(root / "data"), seed=3, **DEMO_SIZES)
    out = {}
    for refit in (False, True):
        out[refit] = root / f"run-{refit}"
        run_prepare(demo_config(root / "data", f"train.refit={str(refit).lower()}"),
                    out[refit], log=lambda m: None, ray_data=False)
    return root / "data", out
