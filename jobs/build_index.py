r"""Build index: ``RUN_DIR/model`` -> versioned item and user embeddings -> ``RUN_DIR/index``.

Inputs: the trained model and ``prepared/items.parquet`` / ``users.parquet``; the ``index``
section of the config. Outputs: ``RUN_DIR/embeddings/{items,users}/model_version=V/``
(Parquet written by Ray Data batch inference in an actor pool, or in this process for
tables up to ``index.local_max_rows`` rows, with ``_run.json``),
``RUN_DIR/index/`` (FAISS index, id map, manifest with the measured recall) and
``RUN_DIR/user_state/`` (the embedded user-state store the endpoint reads users from:
each user's prepared row, seen items and embedding; ``serve_app.user_store``).

    python -m jobs.build_index --config configs/ml100k.yaml --output-dir runs/ml100k
    ray job submit --working-dir . -- python -m jobs.build_index \
        --config configs/ml100k.yaml --output-dir /shared/runs/ml100k --set index.num_actors=4
"""

from __future__ import annotations

import sys
from pathlib import Path

from indexing.build import IndexManifest, build_index
from indexing.embed import embed_towers, key_column, read_embeddings
from jobs.cli import parse_job_args, user_errors
from jobs.ray_setup import ensure_ray
from pipeline.columns import ITEM, USER
from pipeline.config import Config
from pipeline.run_dir import RunDir, read_model_meta, read_prepare_manifest
from serve_app.events import PREFIX
from serve_app.store_build import build_embedded


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cfg: Config, run_dir: Path) -> IndexManifest:
    """Embed both tables, then build and check the index; returns the index manifest."""
    run = RunDir(run_dir)
    meta = read_model_meta(run.model)
    folders = embed_towers(run, cfg.index, meta, log=_log, start_ray=ensure_ray)
    items = read_embeddings(folders[ITEM], key_column(meta, ITEM))[2]
    users = read_embeddings(folders[USER], key_column(meta, USER))[2]
    manifest = build_index(cfg.index, run, meta, items, users, seed=cfg.train.seed, log=_log,
                           embeddings={t: str(f) for t, f in folders.items()})
    prepared = read_prepare_manifest(run).inputs.get("interactions", [])
    build_embedded(run, key_column(meta, USER), meta.model_version,
                   users if cfg.serve.stored_user_embeddings else None,
                   applied=[Path(p).name for p in prepared if Path(p).name.startswith(PREFIX)],
                   log=_log)
    return manifest


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run."""
    cfg, run_dir = parse_job_args(__doc__, argv)
    with user_errors():
        run(cfg, run_dir)


if __name__ == "__main__":
    main()
