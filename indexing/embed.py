"""Batch inference of a tower over a prepared table, into versioned Parquet.

:class:`TowerEmbedder` is the stateful callable Ray Data runs in an actor pool: each actor
loads ``RUN_DIR/model`` once and embeds batches of encoded columns. A table of at most
``index.local_max_rows`` rows is embedded by the same callable in this process (the pool's
start-up costs seconds that a few thousand rows do not repay). Embeddings are written
under ``RUN_DIR/embeddings/{items,users}/model_version=V/`` (Hive-style partitions), with a
``_run.json`` beside the files, so successive trainings keep a history of embeddings and
the run metadata they came from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from indexing.batches import embed, to_tensors
from pipeline.arrow import table_to_numpy, to_arrow_table
from pipeline.columns import ITEM, USER, prefix, tower_columns, tower_inputs
from pipeline.config.index import IndexConfig
from pipeline.run_dir import ModelMeta, RunDir, atomic_dir, read_table, write_json

EMBEDDING = "embedding"
ROW = "row"


class TowerEmbedder:
    """Ray Data callable class: ``{key, tower columns}`` batch -> ``{key, row, embedding}``."""

    def __init__(self, run_dir: str, tower: str, device: str = "cpu", one_thread: bool = True):
        import torch

        from towers.model import load_trained

        if one_thread:  # one core per actor; the pool gives the parallelism
            torch.set_num_threads(1)
        model, meta, fitted = load_trained(RunDir(run_dir), device)
        self._encode = model.encode_item if tower == ITEM else model.encode_user
        self._key = fitted.item_id if tower == ITEM else fitted.user_id
        self._tower, self._device = tower, device
        self.model_version = meta.model_version

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """Embed one batch; keeps the key and the table row number."""
        import torch

        # Ray Data hands fixed-size-list columns over as object arrays of rows: stack them.
        feats = {k: np.stack(v) if v.dtype == object else v for k, v in batch.items()
                 if k.startswith(prefix(self._tower))}
        with torch.no_grad():
            emb = self._encode(tower_inputs(to_tensors(feats, self._device), self._tower))
        return to_arrow_table({self._key: batch[self._key], ROW: batch[ROW],
                               EMBEDDING: emb.float().cpu().numpy()})


def key_column(meta: ModelMeta, tower: str) -> str:
    """The raw key column of a tower's table, as the model's config names it."""
    data = meta.config.data
    return data.item_id if tower == ITEM else data.user_id


def embed_towers(run: RunDir, cfg: IndexConfig, meta: ModelMeta,
                 log: Callable[[str], None], start_ray: Callable[[], None] = lambda: None
                 ) -> dict[str, Path]:
    """Embed the catalogue and every known user with the model of ``meta``.

    ``start_ray`` is called before the first table that goes through Ray Data.

    Returns:
        ``{"item": folder, "user": folder}``, each ``.../model_version=V`` with ``_run.json``.
    """
    folders = {}
    for tower in (ITEM, USER):
        t0 = time.perf_counter()
        folders[tower], where = embed_table(run, tower, key_column(meta, tower), meta, cfg,
                                            start_ray)
        log(f"[build_index] embedded {tower}s with model {meta.model_version} {where} in "
            f"{time.perf_counter() - t0:.1f}s -> {folders[tower]}")
    return folders


def in_process(cfg: IndexConfig, rows: int) -> bool:
    """Whether a table of ``rows`` rows is embedded in this process (``local_max_rows``)."""
    return rows <= cfg.local_max_rows


def embed_table(run: RunDir, tower: str, key: str, meta: ModelMeta, cfg: IndexConfig,
                start_ray: Callable[[], None] = lambda: None) -> tuple[Path, str]:
    """Embed every row of ``prepared/items.parquet`` or ``users.parquet``.

    In this process when the table is small (:func:`in_process`), else with Ray Data in an
    actor pool of ``cfg.num_actors``; the same :class:`TowerEmbedder` either way.

    Returns:
        The partition folder written (``.../model_version=V``), with ``_run.json`` (the
        model's version, hash, metrics and config) beside the Parquet files; and where it
        ran, in words.
    """
    batch_size, device = cfg.batch_size, "cuda" if cfg.use_gpu else "cpu"
    table = read_table(run, tower)
    keep = tower_columns(table.column_names, tower) + [key]
    table = table.select(keep).append_column(ROW, pa.array(np.arange(table.num_rows)))
    out = run.embeddings(tower, meta.model_version)
    local = in_process(cfg, table.num_rows)
    with atomic_dir(out) as tmp:
        if local:
            embedder = TowerEmbedder(str(run.root), tower, device, one_thread=False)
            parts = [embedder(table_to_numpy(table.slice(i, batch_size)))
                     for i in range(0, table.num_rows, batch_size)]
            pq.write_table(pa.concat_tables(parts), tmp / "part-00000.parquet")
        else:
            _embed_ray(run, tower, table, cfg, device, start_ray).write_parquet(str(tmp))
        info = meta.model_dump(mode="json", include={"model_version", "feature_state_hash",
                                                     "metrics", "config"})
        write_json(tmp / "_run.json", dict(info, created_unix=int(time.time())))
    where = (f"in this process ({table.num_rows:,} rows <= index.local_max_rows)" if local
             else f"with Ray Data ({cfg.num_actors} actor(s))")
    return out, where


def _embed_ray(run: RunDir, tower: str, table: pa.Table, cfg: IndexConfig, device: str,
               start_ray: Callable[[], None]):
    """The lazy Ray Data dataset embedding ``table`` in an actor pool."""
    import ray

    start_ray()
    blocks = max(cfg.num_actors, -(-table.num_rows // cfg.batch_size))
    ds = ray.data.from_arrow(table).repartition(blocks)
    return ds.map_batches(
        TowerEmbedder, fn_constructor_kwargs={"run_dir": str(run.root), "tower": tower,
                                              "device": device},
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors), batch_size=cfg.batch_size,
        batch_format="numpy", num_cpus=cfg.num_cpus_per_actor,
        num_gpus=1 if cfg.use_gpu else 0)


def read_embeddings(folder: Path, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(keys [N], rows [N], embeddings [N, D] float32), sorted by row."""
    table = pads.dataset(str(folder), format="parquet").to_table()
    table = table.sort_by(ROW)
    emb = table[EMBEDDING].combine_chunks()
    dim = emb.type.list_size if pa.types.is_fixed_size_list(emb.type) else None
    flat = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    dim = dim or flat.size // max(1, table.num_rows)
    return (table[key].to_numpy(), table[ROW].to_numpy(), flat.reshape(table.num_rows, dim))


def local_embed(run: RunDir, tower: str, encode: Callable, batch_size: int = 4096
                ) -> np.ndarray:
    """Embed a prepared table in this process (small tables, tests): [N, D] float32."""
    table = read_table(run, tower)
    cols = table_to_numpy(table, tower_columns(table.column_names, tower))
    return embed(encode, cols, tower, "cpu", batch_size).numpy()
