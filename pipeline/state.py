"""Fitted feature state: vocabularies and statistics, stored as JSON (never pickle).

Each feature kind's module in :mod:`pipeline.features` fits its own state;
:func:`pipeline.features.fit_feature` dispatches to it through the registry. This module is
plain data: it imports no kind module. The prepare job fits id columns on training
interactions and metadata on the user / item tables, so nothing is learned from validation
or test targets. Vocabularies are ordered by count (descending) then value, which makes the
state identical across runs on the same input.

In memory a state's ``type``, ``pooling`` and ``transform`` are enums; the JSON file holds
their values and :meth:`FeatureStateSet.load` turns them back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.kinds import FeatureKind, NumericTransform, Pooling, kind_member

STATE_VERSION = 1
RESERVED = 2  # index 0 = padding / null, 1 = out of vocabulary


@dataclass(frozen=True)
class FeatureState:
    """Everything a transform and an embedding table need to know about one feature."""

    type: FeatureKind  # or an extension kind's enum member
    source: str
    num_embeddings: int = 0  # rows of the embedding table (0: no table)
    embedding_dim: int = 0
    vocab: list[Any] | None = None
    vocab_type: str | None = None  # "int64" | "string"
    hash_buckets: int | None = None
    max_length: int = 0
    pooling: Pooling | None = None
    transform: NumericTransform | None = None
    mean: float = 0.0
    std: float = 1.0
    fill_value: float = 0.0
    boundaries: list[float] | None = None
    missing_indicator: bool = False
    dim: int = 0
    item_features: list[str] = field(default_factory=list)
    vocab_of: str | None = None  # sequence: name of the item feature whose vocab it shares

    def __post_init__(self) -> None:
        # JSON files and hand-built states give plain strings; in memory they are enums.
        object.__setattr__(self, "type", kind_member(self.type))
        if self.pooling is not None:
            object.__setattr__(self, "pooling", Pooling(self.pooling))
        if self.transform is not None:
            object.__setattr__(self, "transform", NumericTransform(self.transform))

    def vocab_arrow_type(self) -> pa.DataType:
        """The Arrow type of the raw values: int64 or string (also without a vocabulary)."""
        return pa.int64() if self.vocab_type == "int64" else pa.string()

    def vocab_array(self) -> pa.Array:
        """The vocabulary as a typed pyarrow array (for ``pc.index_in``)."""
        if self.vocab is None:
            raise ValueError(f"feature on column {self.source!r} has no vocabulary")
        arr = self.__dict__.get("_vocab_array")
        if arr is None:  # built once per state object; transforms call this per batch
            arr = pa.array(self.vocab, self.vocab_arrow_type())
            object.__setattr__(self, "_vocab_array", arr)
        return arr


@dataclass(frozen=True)
class TowerState:
    """The fitted features of one tower, in config order."""

    features: dict[str, FeatureState]


@dataclass(frozen=True)
class FeatureStateSet:
    """The whole fitted state of an experiment: both towers plus the key columns."""

    user: TowerState
    item: TowerState
    user_id: str
    item_id: str
    version: int = STATE_VERSION

    def to_json(self) -> str:
        """Deterministic JSON text (sorted keys; str-Enum fields written as their values)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, indent=1)

    def content_hash(self) -> str:
        """sha256 of the JSON text: the feature-state identity carried by artifacts."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the JSON file."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> FeatureStateSet:
        """Read a file written by :meth:`save`."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("version") != STATE_VERSION:
            raise ValueError(f"{path}: feature state version {raw.get('version')} is not "
                             f"{STATE_VERSION}; re-run the prepare job")
        towers = {
            t: TowerState({n: FeatureState(**f) for n, f in raw[t]["features"].items()})
            for t in ("user", "item")
        }
        return cls(user=towers["user"], item=towers["item"], user_id=raw["user_id"],
                   item_id=raw["item_id"], version=raw["version"])


def fit_vocab(values: pa.Array, min_count: int, max_vocab: int | None) -> tuple[list, str]:
    """Distinct non-null values seen >= min_count times, most frequent first (ties by value).

    Returns:
        (vocabulary, "int64" or "string").
    """
    arr = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    if pa.types.is_integer(arr.type):
        arr, vtype = pc.cast(arr, pa.int64()), "int64"
    else:
        arr, vtype = pc.cast(arr, pa.string()), "string"
    counts = pc.value_counts(arr.drop_null())
    vals, cnts = counts.field("values"), counts.field("counts").to_numpy()
    keep = cnts >= min_count
    vals = vals.filter(pa.array(keep))
    cnts = cnts[keep]
    order = pc.sort_indices(
        pa.table({"c": cnts, "v": vals}), sort_keys=[("c", "descending"), ("v", "ascending")]
    )
    out = vals.take(order).to_pylist()
    return (out[:max_vocab] if max_vocab else out), vtype
