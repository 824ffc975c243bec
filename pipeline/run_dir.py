"""The run-directory layout, its typed metadata, and atomic writes: one home for each.

Every job reads and writes one ``RUN_DIR``::

    RUN_DIR/
      prepared/     train/ validation/ test/ (Parquet), sequences/ (training windows),
                    items.parquet, users.parquet, feature_state.json, manifest.json
                                                                  <- jobs.prepare
      train/        Ray Train storage (checkpoints)               <- jobs.train
      plain/best/   the plain loop's best checkpoint              <- jobs.train --no-ray
      plain/latest/ the plain loop's last epoch, optimizer included (resume)
      mlruns/       the default MLflow file store
      model/        model.pt, meta.json, user_tower.pt2 (+ .json), item_tower.pt2 (+ .json)
      embeddings/   items/model_version=V/, users/model_version=V/ <- jobs.build_index
      index/        the FAISS index, its id map, manifest.json    <- jobs.build_index
      metrics.json                                                 <- jobs.evaluate

:class:`RunDir` names every path; :func:`atomic_dir` writes a folder next to its final
place and renames it in one step, so a failed step never leaves a partial artifact. The
JSON metadata (:class:`ModelMeta`, :class:`PrepareManifest`, and the index's manifest in
``indexing.build``) is read through pydantic models, so code past this edge never indexes a
raw dict.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.arrow import table_to_numpy
from pipeline.columns import ITEM, USER, tower_columns
from pipeline.config import Config
from pipeline.config.base import is_prepare_key
from pipeline.config.plan import ModelPlan
from pipeline.splits import SPLIT_NAMES, trained_on
from pipeline.state import FeatureStateSet

SPLITS = ("train", "validation", "test")
SEQUENCES = "sequences"  # under prepared/: the trained splits cut into windows per user
MODEL_FILE, OPTIM_FILE, META_FILE = "model.pt", "optimizer.pt", "meta.json"
MANIFEST = "manifest.json"
FEATURE_STATE = "feature_state.json"
TABLES = {ITEM: "items.parquet", USER: "users.parquet"}  # under prepared/

M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created by naming a path)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root))

    @property
    def prepared(self) -> Path:
        """``prepared/``: the encoded splits, tables and fitted state."""
        return self.root / "prepared"

    def split(self, name: str) -> Path:
        """``prepared/{train,validation,test}/`` or ``prepared/sequences/``."""
        if name not in (*SPLITS, SEQUENCES):
            raise ValueError(f"split {name!r} is not one of {(*SPLITS, SEQUENCES)}")
        return self.prepared / name

    def table(self, tower: str) -> Path:
        """``prepared/items.parquet`` (the catalogue) or ``prepared/users.parquet``."""
        return self.prepared / TABLES[tower]

    @property
    def feature_state(self) -> Path:
        """``prepared/feature_state.json``."""
        return self.prepared / FEATURE_STATE

    @property
    def prepare_manifest(self) -> Path:
        """``prepared/manifest.json``."""
        return self.prepared / MANIFEST

    @property
    def train_storage(self) -> Path:
        """``train/``: the default Ray Train storage (absolute, as Ray wants it)."""
        return self.root.resolve() / "train"

    @property
    def plain_best(self) -> Path:
        """``plain/best/``: the plain loop's best checkpoint."""
        return self.root / "plain" / "best"

    @property
    def plain_latest(self) -> Path:
        """``plain/latest/``: the plain loop's last epoch, with the optimizer (to resume)."""
        return self.root / "plain" / "latest"

    @property
    def mlruns(self) -> Path:
        """``mlruns/``: the default MLflow file store."""
        return self.root / "mlruns"

    @property
    def mlflow_run_id(self) -> Path:
        """``mlflow_run_id``: the MLflow run this directory logs to (resumes append to it)."""
        return self.root / "mlflow_run_id"

    @property
    def model(self) -> Path:
        """``model/``: the published best model."""
        return self.root / "model"

    def exported_tower(self, tower: str) -> Path:
        """``model/{user,item}_tower.pt2``: a tower as a standalone program."""
        return self.model / f"{tower}_tower.pt2"

    @property
    def index(self) -> Path:
        """``index/``: the FAISS index, id map and manifest."""
        return self.root / "index"

    def embeddings(self, tower: str, model_version: str) -> Path:
        """``embeddings/{items,users}/model_version=V/``."""
        return self.root / "embeddings" / f"{tower}s" / f"model_version={model_version}"

    @property
    def user_state(self) -> Path:
        """``user_state/``: the embedded user-state store (LMDB) and its ``layout.json``."""
        return self.root / "user_state"

    @property
    def metrics(self) -> Path:
        """``metrics.json``."""
        return self.root / "metrics.json"

    def require_prepared(self) -> Path:
        """``prepared/``, checked to hold a fitted state."""
        if not self.feature_state.exists():
            raise FileNotFoundError(f"{self.prepared} has no feature_state.json: run "
                                    "`python -m jobs.prepare` first")
        return self.prepared


# -- atomic writes -----------------------------------------------------------------------


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final``; on success it replaces ``final``.

    On an error the temporary folder is removed, and so are the parent folders this call
    created (when still empty): ``final`` and its surroundings are left as they were.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp")
    created = [d for d in (tmp.parent, *tmp.parent.parents) if not d.exists()]  # deepest first
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:  # not empty (someone else wrote there) or already gone
                break
        raise
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():  # two renames: ``final`` is missing only between them
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, body: Any) -> None:
    """Write JSON (sorted keys) to a temporary file and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=True), encoding="utf-8")
    tmp.replace(path)


# -- typed metadata ----------------------------------------------------------------------


class _Meta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelMeta(_Meta):
    """``meta.json`` of a checkpoint or of ``model/``: what the weights are."""

    model_version: str = Field(description="Content hash of the state_dict.")
    feature_state_hash: str = Field(description="Hash of the feature state trained on.")
    config: Config = Field(description="The resolved experiment config.")
    plan: ModelPlan | None = Field(
        default=None, description="The towers as the config resolved them, which the model "
        "is built from (None in a meta written before plans: the config's own plan).")
    metrics: dict[str, float] = Field(default_factory=dict, description="The epoch's metrics.")
    train_state: dict[str, Any] = Field(default_factory=dict, description="Loop state.")
    is_best: bool = Field(default=False, description="Best epoch so far when saved.")


class PrepareManifest(_Meta):
    """``prepared/manifest.json``: what prepare read and wrote."""

    feature_state_hash: str
    rows: dict[str, int]
    items: int
    users: int
    interactions_read: int
    inputs: dict[str, list[str]]
    config: Config
    seconds: float
    median_history: float | None = None  # interactions per split user (median)
    tie_rate: float | None = None  # share of a user's consecutive interactions at one time


def read_meta(path: str | Path, model: type[M], missing_hint: str) -> M:
    """Read and validate one JSON metadata file.

    Raises:
        FileNotFoundError: the file is missing (with ``missing_hint``, the command to run).
        ValueError: the file is not valid JSON or lacks a field (naming file and field).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {missing_hint}")
    try:
        return model.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<top>'}: {e['msg']}"
                           for e in err.errors()[:5])
        raise ValueError(f"{path}: invalid {model.__name__}: {fields}") from None


def read_model_meta(directory: str | Path) -> ModelMeta:
    """The ``meta.json`` of a checkpoint or model directory."""
    return read_meta(Path(directory) / META_FILE, ModelMeta,
                     "not a checkpoint or model directory (run `python -m jobs.train`)")


def read_prepare_manifest(run: RunDir) -> PrepareManifest:
    """``prepared/manifest.json``."""
    return read_meta(run.prepare_manifest, PrepareManifest, "run `python -m jobs.prepare`")


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf; list entries by index, as ``--set`` names them."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [("len", len(value)), *enumerate(value)]
    else:
        yield path, value
        return
    for key, sub in items:
        yield from _leaves(sub, f"{path}.{key}" if path else str(key))


def prepare_differences(prepared: Config, cfg: Config) -> list[str]:
    """``PATH: PREPARED -> CFG`` for every prepare-time key (PREPARE_KEYS) that differs."""
    def flat(c: Config) -> dict[str, Any]:
        return {p: v for p, v in _leaves(c.model_dump(mode="json")) if is_prepare_key(p)}
    before, after = flat(prepared), flat(cfg)
    return [f"{p}: {before.get(p, '(absent)')!r} -> {after.get(p, '(absent)')!r}"
            for p in sorted(before.keys() | after.keys()) if before.get(p) != after.get(p)]


def require_prepared_as(run: RunDir, cfg: Config) -> PrepareManifest:
    """The run's prepare manifest, checked to have been made with ``cfg``'s prepare keys.

    Vocabularies, table widths, windows and the split are fixed when a run is prepared, so
    a job after prepare whose config says otherwise would train, tune or serve what was
    prepared while its config claims something else. It is refused, naming each key.
    """
    run.require_prepared()
    manifest = read_prepare_manifest(run)
    diffs = prepare_differences(manifest.config, cfg)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise ValueError(f"{run.prepared} was prepared with other values of keys that prepare "
                         f"fixes ({shown}): re-run `python -m jobs.prepare` with this config, "
                         "or use the values the run was prepared with")
    return manifest


# -- prepared tables ---------------------------------------------------------------------


def read_split(run: RunDir, name: str, columns: list[str] | None = None) -> pa.Table:
    """One split folder of the prepared data (all its files, in path order)."""
    path = run.split(name)
    if not path.exists():
        why = (" with one user sequence feature (sequence.feature names it when there are "
               "several)") if name == SEQUENCES else ""
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.prepare`{why} first")
    return pads.dataset(str(path), format="parquet").to_table(columns=columns)


def trained_splits(refit: bool) -> list[str]:
    """The split folders a model trains on: ``train``, plus ``validation`` when refit."""
    return [SPLIT_NAMES[code] for code in trained_on(refit)]


def read_trained(run: RunDir, refit: bool, columns: list[str] | None = None) -> pa.Table:
    """The interactions a model trains on (:func:`trained_splits`), one table."""
    return pa.concat_tables([read_split(run, name, columns) for name in trained_splits(refit)])


def read_table(run: RunDir, tower: str) -> pa.Table:
    """``prepared/items.parquet`` or ``prepared/users.parquet``."""
    path = run.table(tower)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m jobs.prepare` first")
    return pq.read_table(path)


def catalogue_hash(ids: pa.Array | pa.ChunkedArray) -> str:
    """The identity of a catalogue's id column, in row order (16 hex digits of sha256).

    Integer ids hash as int64, string ids as their UTF-8 bytes with each length, so equal
    columns give equal hashes however they are chunked, and any reordering, insertion or
    edit changes it. Row i of the index is row i of this column, which is why the order
    is part of the identity.
    """
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    digest = hashlib.sha256()
    if pa.types.is_integer(arr.type):
        digest.update(b"int64:")
        digest.update(np.ascontiguousarray(arr.cast(pa.int64()).to_numpy()).tobytes())
    else:
        text = arr.cast(pa.large_string())
        n, offset = len(text), text.offset
        offsets = np.frombuffer(text.buffers()[1], np.int64)[offset:offset + n + 1]
        data = text.buffers()[2]
        digest.update(b"utf8:")
        digest.update(np.diff(offsets).tobytes())
        if data is not None:
            digest.update(memoryview(data)[offsets[0]:offsets[-1]])
    return digest.hexdigest()[:16]


def read_catalogue(run: RunDir) -> dict[str, np.ndarray]:
    """The encoded catalogue (row number = item_index): its ``item__*`` columns as numpy."""
    table = read_table(run, ITEM)
    return table_to_numpy(table, tower_columns(table.column_names, ITEM))


def load_fitted(run: RunDir, meta: ModelMeta) -> FeatureStateSet:
    """The fitted state of ``prepared/``, checked to be the one the model was trained on.

    Raises:
        FileNotFoundError: ``prepared/`` has no feature state.
        ValueError: the model was trained on another feature state (names both hashes).
    """
    run.require_prepared()
    fitted = FeatureStateSet.load(run.feature_state)
    if fitted.content_hash() != meta.feature_state_hash:
        raise ValueError(f"{run.model} was trained on feature state {meta.feature_state_hash}, "
                         f"but {run.prepared} holds {fitted.content_hash()}: re-run jobs.train")
    return fitted
