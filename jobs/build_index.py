"""Build index: ``RUN_DIR/model`` -> versioned item and user embeddings -> ``RUN_DIR/index``.

Inputs: the trained model and ``prepared/items.parquet`` / ``users.parquet``; the ``index``
section of the config. Outputs: ``RUN_DIR/embeddings/{items,users}/model_version=V/``
(Parquet written by Ray Data batch inference in an actor pool, with ``_run.json``) and
``RUN_DIR/index/`` (FAISS index, id map, manifest with the measured recall).

    python -m jobs.build_index --config configs/ml100k.yaml --output-dir runs/ml100k
    ray job submit --working-dir . -- python -m jobs.build_index \
        --config configs/ml100k.yaml --output-dir /shared/runs/ml100k --set index.num_actors=4
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from jobs.cli import parse_job_args, user_errors
from pipeline.config import Config


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cfg: Config, run_dir: Path) -> dict:
    """Embed both tables, then build and check the index; returns the index manifest."""
    from indexing.build import build_index
    from indexing.embed import embed_table, read_embeddings, write_run_info
    from pipeline.ray_setup import ensure_ray
    from training.checkpoint import read_meta
    from training.data import ITEM, USER

    meta = read_meta(Path(run_dir) / "model")
    version = meta["model_version"]
    ensure_ray()
    folders = {}
    for tower in (ITEM, USER):
        t0 = time.perf_counter()
        ix = cfg.index
        folders[tower] = embed_table(run_dir, tower, version, ix.num_actors,
                                     ix.num_cpus_per_actor, ix.batch_size, ix.use_gpu)
        write_run_info(folders[tower], {
            "model_version": version, "feature_state_hash": meta["feature_state_hash"],
            "metrics": meta.get("metrics", {}), "config": meta["config"],
            "created_unix": int(time.time())})
        _log(f"[build_index] embedded {tower}s with model {version} in "
             f"{time.perf_counter() - t0:.1f}s -> {folders[tower]}")
    _, _, items = read_embeddings(folders[ITEM], _key(meta, ITEM))
    _, _, users = read_embeddings(folders[USER], _key(meta, USER))
    return build_index(cfg, run_dir, items, users, log=_log,
                       extra={"embeddings": {t: str(f) for t, f in folders.items()}})


def _key(meta: dict, tower: str) -> str:
    data = meta["config"]["data"]
    return data["item_id"] if tower == "item" else data["user_id"]


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run."""
    cfg, run_dir = parse_job_args(__doc__.splitlines()[0], argv)
    with user_errors():
        run(cfg, run_dir)


if __name__ == "__main__":
    main()
