"""The prepare step: validate -> read (Ray Data) -> split -> fit -> transform -> write.

Outputs under ``RUN_DIR/prepared/``:

- ``train/``, ``validation/``, ``test/``: one row per interaction with the raw keys,
  ``item_index`` (row in ``items.parquet``), every encoded user feature (``user__NAME``,
  the history sequence built from strictly earlier interactions) and every encoded item
  feature (``item__NAME``); with ``loss.impressions_column``, ``impressions`` [L]: the
  catalogue rows of the first ``loss.max_impressions`` known impression ids, -1 padded;
- ``sequences/``: the training split cut into windows per user (when the user features
  have one sequence feature, or ``sequence.feature`` names one): ``max_length + 1`` items
  each, oldest first and pre-padded, with the user's static features, the history columns
  over the window and each item's catalogue row, weight and timestamp (the sequence
  training mode);
- ``items.parquet``: the encoded catalogue, one row per item, in ``item_index`` order;
- ``users.parquet``: the encoded features and latest full history of every known user,
  plus ``seen_item_index`` (for serving: a known user id alone is enough);
- ``feature_state.json`` (vocabularies and statistics) and ``manifest.json``.

Everything is written to a temporary folder renamed at the end, so a failed run leaves
no partial ``prepared/``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa

from pipeline import config as C
from pipeline.errors import TableError, in_table
from pipeline.features import spec_of
from pipeline.features.sequence import fit_history
from pipeline.run_dir import (
    FEATURE_STATE,
    MANIFEST,
    PrepareManifest,
    RunDir,
    atomic_dir,
    write_json,
)
from pipeline.splits import TRAIN
from pipeline.state import FeatureStateSet, TowerState
from prepare import split, tables
from prepare.interactions import Interactions, order_interactions
from prepare.read import read_tables, validate_inputs
from prepare.rows import build_context
from prepare.write import SplitWriter, write_local, write_splits, write_tables

Log = Callable[[str], None]


def run_prepare(cfg: C.Config, run_dir: str | Path, log: Log = print,
                files: dict[str, tables.TableFiles] | None = None, ray_data: bool = True
                ) -> PrepareManifest:
    """Run the whole prepare step; returns the manifest it wrote.

    Args:
        cfg: the experiment config.
        run_dir: RUN_DIR; ``prepared/`` is replaced only when every file is written.
        log: progress lines.
        files: the inputs :func:`validate_inputs` already checked (checked here if None).
        ray_data: read and write through Ray Data on the running Ray (the job); False runs
            the same steps in this process (the benchmark's baseline, small data).
    """
    t0 = time.perf_counter()
    files = files or validate_inputs(cfg)
    inputs = {t.name: t.paths for t in files.values()}
    run = RunDir(run_dir)
    try:
        users, items, raw = read_tables(files, cfg, log, ray_data=ray_data)
        with atomic_dir(run.prepared) as tmp:
            manifest = prepare_tables(cfg, users, items, raw, tmp,
                                      write_splits if ray_data else write_local, log, inputs, t0)
    except TableError as err:  # a bad value found in the data: name its file
        raise tables.locate_error(err, files) from None
    log(f"[prepare] wrote {run.prepared} in {manifest.seconds}s: {manifest.rows}")
    return manifest


def in_process(cfg: C.Config, files: dict[str, tables.TableFiles]) -> bool:
    """Whether prepare runs in this process: at most ``prepare.local_max_rows`` interactions.

    Ray Data pays seconds of fixed start-up per read and write (ML-100K: 9.8 s through Ray
    Data against 0.7 s in one process, README "Prepare throughput"); it is there to scale
    out past what one process holds.
    """
    return sum(files["interactions"].rows) <= cfg.prepare.local_max_rows


def prepare_tables(cfg: C.Config, users: pa.Table, items: pa.Table, raw: pa.Table,
                   out: Path, write: SplitWriter, log: Log,
                   inputs: dict[str, list[str]] | None = None,
                   started: float | None = None) -> PrepareManifest:
    """Split, fit, encode and write the prepared data of three read tables into ``out``.

    The one implementation of the step: the job passes the Ray Data split writer, the
    benchmark's single-process baseline the local one. Writes ``out/manifest.json`` with
    ``inputs`` (table -> files read) and the seconds since ``started`` (default: now).
    """
    t0 = time.perf_counter() if started is None else started
    inter = order_interactions(raw, items, cfg, log)
    stats = split.split_stats(inter.split, inter.timestamp)
    log(f"[prepare] data: {stats.describe()}, {items.num_rows:,} items")
    fitted = fit_state(cfg, inter, users, items)
    log(f"[prepare] fitted feature state {fitted.content_hash()} "
        f"({time.perf_counter() - t0:.1f}s)")
    ctx = build_context(cfg, fitted, inter, users, items)
    counts = write(ctx, inter, out, cfg, log)
    n_users = write_tables(ctx, inter, users, items, fitted, out)
    fitted.save(out / FEATURE_STATE)
    manifest = PrepareManifest(
        feature_state_hash=fitted.content_hash(), rows=counts, items=items.num_rows,
        users=n_users, interactions_read=raw.num_rows, inputs=dict(inputs or {}), config=cfg,
        seconds=round(time.perf_counter() - t0, 2), median_history=stats.median_history,
        tie_rate=stats.tie_rate)
    write_json(out / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def fit_state(cfg: C.Config, inter: Interactions, users: pa.Table,
              items: pa.Table) -> FeatureStateSet:
    """Fit every feature: ids on training interactions, metadata on the tables."""
    train = inter.split.split == TRAIN
    train_users = inter.user_id.filter(pa.array(train))
    train_items = inter.item_id.filter(pa.array(train))
    d = cfg.data

    def fit_tower(feats: list, table: pa.Table, key: str, key_values: pa.Array) -> TowerState:
        fitted = {}
        for f in feats:
            spec = spec_of(f.type)
            if spec.table_column:  # sequences are fitted below, from the interactions
                col = key_values if f.source == key else table[f.source].combine_chunks()
                fitted[f.name] = spec.fit_column(f, col)
        return TowerState(fitted)

    with in_table("items"):
        item_tower = fit_tower(cfg.features.item, items, d.item_id, train_items)
    with in_table("users"):
        user_tower = fit_tower(cfg.features.user, users, d.user_id, train_users)
    feats = dict(user_tower.features)
    for f in cfg.features.user:
        if isinstance(f, C.SequenceFeature):
            feats[f.name] = fit_history(f, train_items, item_tower, d.item_id)
    ordered = {f.name: feats[f.name] for f in cfg.features.user}
    return FeatureStateSet(user=TowerState(ordered), item=item_tower,
                           user_id=d.user_id, item_id=d.item_id)
