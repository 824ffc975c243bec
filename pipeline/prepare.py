"""The prepare step: validate -> read (Ray Data) -> split -> fit -> transform -> write.

This is pipeline's only Ray-facing module. Outputs under ``RUN_DIR/prepared/``:

- ``train/``, ``validation/``, ``test/``: one row per interaction with the raw keys,
  ``item_index`` (row in ``items.parquet``), every encoded user feature (``user__NAME``,
  the history sequence built from strictly earlier interactions) and every encoded item
  feature (``item__NAME``); with ``loss.impressions_column``, ``impressions`` [L]: the
  catalogue rows of the first ``loss.max_impressions`` known impression ids, -1 padded;
- ``sequences/``: the training split cut into windows per user (when the user features
  have one sequence feature, or ``sequence.feature`` names one): ``max_length + 1`` items
  each, oldest first and pre-padded, with the user's static features, the history columns
  over the window and each item's catalogue row and weight (the sequence training mode);
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline import io, split
from pipeline.features import spec_of
from pipeline.features.sequence import fit_history
from pipeline.rows import (
    Interactions,
    SplitWriter,
    build_context,
    impression_rows,
    write_local,
    write_splits,
    write_tables,
)
from pipeline.run_dir import (
    FEATURE_STATE,
    MANIFEST,
    PrepareManifest,
    RunDir,
    atomic_dir,
    write_json,
)
from pipeline.state import FeatureStateSet, TowerState

Log = Callable[[str], None]


def run_prepare(cfg: C.Config, run_dir: str | Path, log: Log = print,
                files: dict[str, io.TableFiles] | None = None, ray_data: bool = True
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
    users, items, raw = read_tables(files, cfg, log, ray_data=ray_data)
    inputs = {t.name: t.paths for t in files.values()}
    run = RunDir(run_dir)
    with atomic_dir(run.prepared) as tmp:
        manifest = prepare_tables(cfg, users, items, raw, tmp,
                                  write_splits if ray_data else write_local, log, inputs, t0)
    log(f"[prepare] wrote {run.prepared} in {manifest.seconds}s: {manifest.rows}")
    return manifest


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
        seconds=round(time.perf_counter() - t0, 2))
    write_json(out / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def validate_inputs(cfg: C.Config) -> dict[str, io.TableFiles]:
    """Resolve and check the three tables' files; raises before anything is read."""
    needed = io.required_columns(cfg)
    files = {}
    for name in ("interactions", "users", "items"):
        tf = io.resolve_files(name, cfg.data.resolve(getattr(cfg.data, name)))
        io.validate_table(tf, needed[name])
        files[name] = tf
    return files


def read_tables(files: dict[str, io.TableFiles], cfg: C.Config, log: Log,
                ray_data: bool = True) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Read users, items and interactions (file order kept), checked, as Arrow tables.

    ``ray_data``: through Ray Data on the running Ray; otherwise pyarrow in this process.
    """
    needed = io.required_columns(cfg)
    read = _read_ray if ray_data else _read_local
    out = []
    for name in ("users", "items", "interactions"):
        tf = files[name]
        table = read(tf, list(needed[name]))
        log(f"[prepare] read {name}: {table.num_rows:,} rows from {len(tf.paths)} file(s)")
        out.append(table.combine_chunks())
    return checked_tables(*out, cfg, files)


def _read_ray(tf: io.TableFiles, columns: list[str]) -> pa.Table:
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # ties
    ds = ray.data.read_parquet(tf.paths, filesystem=tf.filesystem).select_columns(columns)
    return pa.concat_tables(ray.get(list(ds.to_arrow_refs())), promote_options="default")


def _read_local(tf: io.TableFiles, columns: list[str]) -> pa.Table:
    import pyarrow.dataset as pads

    return pads.dataset(tf.paths, filesystem=tf.filesystem, format="parquet").to_table(
        columns=columns)


def checked_tables(users: pa.Table, items: pa.Table, inter: pa.Table, cfg: C.Config,
                   files: dict[str, io.TableFiles]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """The three read tables, with unique non-null keys in users and items, valid weights."""
    d = cfg.data
    for name, table, key in (("users", users, d.user_id), ("items", items, d.item_id)):
        _check_unique(name, table[key])
    if d.weight and _bad_weights(inter[d.weight]).any():
        _raise_bad_weight(files["interactions"], d.weight)
    return users, items, inter


def _bad_weights(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """[N] bool, True where a weight is null, NaN, infinite or negative."""
    w = pc.cast(values, pa.float64())
    ok = pc.and_(pc.is_finite(w), pc.greater_equal(w, 0.0)).fill_null(False)
    return ~ok.to_numpy(zero_copy_only=False)


def _raise_bad_weight(files: io.TableFiles, column: str) -> None:
    """Find the first file holding an invalid weight (read only on this error path) and say so.

    Raises:
        ValueError: naming the file, the column, the value and what is accepted.
    """
    for path in files.paths:
        values = pq.read_table(path, columns=[column], filesystem=files.filesystem)[column]
        bad = np.flatnonzero(_bad_weights(values))
        if len(bad):
            raise ValueError(
                f"{files.name} table, file {path}: column {column!r} (data.weight) has "
                f"{len(bad)} invalid weight(s), the first {values[int(bad[0])].as_py()!r} at "
                f"row {int(bad[0])}; a weight must be a finite number >= 0 (no null, NaN "
                "or negative values)")
    raise ValueError(f"{files.name} table: column {column!r} (data.weight) has a null, NaN "
                     "or negative weight; a weight must be a finite number >= 0")


def _check_unique(name: str, keys: pa.ChunkedArray) -> None:
    counts = pc.value_counts(keys)
    dup = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dup):
        raise ValueError(f"{name} table: key {dup[0]['values'].as_py()!r} appears "
                         f"{dup[0]['counts'].as_py()} times; keys must be unique")
    if keys.null_count:
        raise ValueError(f"{name} table: {keys.null_count} rows have a null key")


def order_interactions(raw: pa.Table, items: pa.Table, cfg: C.Config, log: Log) -> Interactions:
    """Drop interactions with unknown items or null keys, then split per user by time."""
    d = cfg.data
    item_index = pc.index_in(raw[d.item_id], value_set=items[d.item_id]).to_numpy(
        zero_copy_only=False)
    ok = ~np.isnan(item_index.astype(float)) & ~raw[d.user_id].is_null().to_numpy(
        zero_copy_only=False)
    if (~ok).sum():
        log(f"[prepare] dropping {int((~ok).sum()):,} interactions with a null user or an "
            "item missing from the item table")
    raw = raw.filter(pa.array(ok))
    item_index = np.asarray(item_index[ok], dtype=np.int64)
    ts = raw[d.timestamp]
    if pa.types.is_timestamp(ts.type):
        ts = pc.cast(ts, pa.int64())
    ts = ts.to_numpy().astype(np.int64)
    codes = pc.dictionary_encode(raw[d.user_id]).combine_chunks().indices.to_numpy()
    sp = split.leave_last_out(codes, ts, cfg.prepare.min_user_interactions)
    o = sp.order
    weight = (raw[d.weight].to_numpy().astype(np.float32)[o] if d.weight
              else np.ones(len(o), np.float32))
    imp_col = cfg.loss.impressions_column
    imp = impression_rows(raw[imp_col].take(o).combine_chunks(),
                          items[d.item_id].combine_chunks(), imp_col) if imp_col else None
    return Interactions(user_id=raw[d.user_id].take(o).combine_chunks(),
                        item_id=raw[d.item_id].take(o).combine_chunks(),
                        timestamp=ts[o], weight=weight, item_index=item_index[o], split=sp,
                        impressions=imp)


def fit_state(cfg: C.Config, inter: Interactions, users: pa.Table,
              items: pa.Table) -> FeatureStateSet:
    """Fit every feature: ids on training interactions, metadata on the tables."""
    train = inter.split.split == split.TRAIN
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

    item_tower = fit_tower(cfg.features.item, items, d.item_id, train_items)
    user_tower = fit_tower(cfg.features.user, users, d.user_id, train_users)
    feats = dict(user_tower.features)
    for f in cfg.features.user:
        if isinstance(f, C.SequenceFeature):
            feats[f.name] = fit_history(f, train_items, item_tower, d.item_id)
    ordered = {f.name: feats[f.name] for f in cfg.features.user}
    return FeatureStateSet(user=TowerState(ordered), item=item_tower,
                           user_id=d.user_id, item_id=d.item_id)


