"""Batch inference of a tower over a prepared table with Ray Data, into versioned Parquet.

:class:`TowerEmbedder` is the stateful callable Ray Data runs in an actor pool: each actor
loads ``RUN_DIR/model`` once and embeds batches of encoded columns. Embeddings are written
under ``RUN_DIR/embeddings/{items,users}/model_version=V/`` (Hive-style partitions), with a
``_run.json`` beside the files, so successive trainings keep a history of embeddings and
the run metadata they came from.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.config_run import IndexConfig
from pipeline.io import to_arrow_table
from training.data import ITEM, USER, prefix, table_to_numpy, to_tensors, tower_inputs
from training.evaluate import embed

EMBEDDING = "embedding"
TABLES = {ITEM: "items.parquet", USER: "users.parquet"}  # under prepared/


class TowerEmbedder:
    """Ray Data callable class: ``{key, tower columns}`` batch -> ``{key, row, embedding}``."""

    def __init__(self, run_dir: str, tower: str, device: str = "cpu"):
        import torch

        from training.checkpoint import load_model

        torch.set_num_threads(1)  # one core per actor; the pool gives the parallelism
        model, meta, fitted, _ = load_model(Path(run_dir), device)
        self._encode = model.encode_item if tower == ITEM else model.encode_user
        self._key = fitted.item_id if tower == ITEM else fitted.user_id
        self._tower, self._device = tower, device
        self.model_version = meta["model_version"]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Embed one batch; keeps the key and the table row number."""
        import torch

        # Ray Data hands fixed-size-list columns over as object arrays of rows: stack them.
        feats = {k: np.stack(v) if v.dtype == object else v for k, v in batch.items()
                 if k.startswith(prefix(self._tower))}
        with torch.no_grad():
            emb = self._encode(tower_inputs(to_tensors(feats, self._device), self._tower))
        return to_arrow_table({self._key: batch[self._key], "row": batch["row"],
                               EMBEDDING: emb.float().cpu().numpy()})


def key_column(meta: dict[str, Any], tower: str) -> str:
    """The raw key column of a tower's table, as the model's config names it."""
    data = meta["config"]["data"]
    return data["item_id"] if tower == ITEM else data["user_id"]


def embed_towers(run_dir: Path, cfg: IndexConfig, meta: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, Path]:
    """Embed the catalogue and every known user with the model of ``meta``.

    Returns:
        ``{"item": folder, "user": folder}``, each ``.../model_version=V`` with ``_run.json``.
    """
    folders = {}
    for tower in (ITEM, USER):
        t0 = time.perf_counter()
        folders[tower] = embed_table(run_dir, tower, key_column(meta, tower),
                                     meta["model_version"], cfg)
        write_run_info(folders[tower], {
            "model_version": meta["model_version"],
            "feature_state_hash": meta["feature_state_hash"],
            "metrics": meta.get("metrics", {}), "config": meta["config"],
            "created_unix": int(time.time())})
        log(f"[build_index] embedded {tower}s with model {meta['model_version']} in "
            f"{time.perf_counter() - t0:.1f}s -> {folders[tower]}")
    return folders


def embed_table(run_dir: Path, tower: str, key: str, model_version: str,
                cfg: IndexConfig) -> Path:
    """Embed every row of ``prepared/items.parquet`` or ``users.parquet`` with Ray Data.

    Returns:
        The partition folder written (``.../model_version=V``).
    """
    import ray

    num_actors, batch_size, use_gpu = cfg.num_actors, cfg.batch_size, cfg.use_gpu
    source = Path(run_dir) / "prepared" / TABLES[tower]
    table = pads.dataset(str(source)).to_table()
    keep = [c for c in table.column_names if c.startswith(prefix(tower)) or c == key]
    table = table.select(keep).append_column("row", pa.array(np.arange(table.num_rows)))
    blocks = max(num_actors, -(-table.num_rows // batch_size))
    ds = ray.data.from_arrow(table).repartition(blocks)
    ds = ds.map_batches(
        TowerEmbedder, fn_constructor_kwargs={"run_dir": str(run_dir), "tower": tower,
                                              "device": "cuda" if use_gpu else "cpu"},
        compute=ray.data.ActorPoolStrategy(size=num_actors), batch_size=batch_size,
        batch_format="numpy", num_cpus=cfg.num_cpus_per_actor, num_gpus=1 if use_gpu else 0)
    out = embeddings_dir(run_dir, tower, model_version)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds.write_parquet(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def embeddings_dir(run_dir: Path, tower: str, model_version: str) -> Path:
    """``RUN_DIR/embeddings/{items,users}/model_version=V``."""
    return Path(run_dir) / "embeddings" / f"{tower}s" / f"model_version={model_version}"


def write_run_info(folder: Path, info: dict[str, Any]) -> None:
    """The run metadata kept beside one version's embeddings."""
    (Path(folder) / "_run.json").write_text(json.dumps(info, indent=1, sort_keys=True))


def read_embeddings(folder: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys [N], rows [N], embeddings [N, D] float32), sorted by row."""
    table = pads.dataset(str(folder), format="parquet").to_table()
    table = table.sort_by("row")
    emb = table[EMBEDDING].combine_chunks()
    dim = emb.type.list_size if pa.types.is_fixed_size_list(emb.type) else None
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    dim = dim or flat.size // max(1, table.num_rows)
    return (table[key].to_numpy(), table["row"].to_numpy(), flat.reshape(table.num_rows, dim))


def local_embed(run_dir: Path, tower: str, encode: Callable, batch_size: int = 4096
                ) -> np.ndarray:
    """Embed a prepared table in this process (small tables, tests): [N, D] float32."""
    table = pads.dataset(str(Path(run_dir) / "prepared" / TABLES[tower])).to_table()
    cols = table_to_numpy(table, [c for c in table.column_names if c.startswith(prefix(tower))])
    return embed(encode, cols, tower, "cpu", batch_size).numpy()
