"""Fitted feature state: vocabularies and statistics, stored as JSON (never pickle).

Each feature kind's module in :mod:`pipeline.features` fits its own state; :func:`fit_feature`
dispatches to it through the registry. The prepare job fits id columns on training
interactions and metadata on the user / item tables, so nothing is learned from validation
or test targets. Vocabularies are ordered by count (descending) then value, which makes the
state identical across runs on the same input.

In memory a state's ``type``, ``pooling`` and ``transform`` are enums; the JSON file holds
their values and :meth:`FeatureStateSet.load` turns them back.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from pipeline.features.base import FeatureConfig, KindSpec
    from pipeline.transforms import VocabIndex

STATE_VERSION = 1
RESERVED = 2  # index 0 = padding / null, 1 = out of vocabulary


class FeatureKind(str, enum.Enum):
    """The built-in feature kinds: the ``type`` of a feature config and of its fitted state.

    Each has one entry in :data:`pipeline.features.REGISTRY`; an extension kind registers a
    member of its own str-Enum there instead.
    """

    CATEGORICAL = "categorical"
    MULTI_HOT = "multi_hot"
    TEXT = "text"
    NUMERIC = "numeric"
    DENSE_VECTOR = "dense_vector"
    SEQUENCE = "sequence"


class Pooling(str, enum.Enum):
    """How a bag of embeddings (multi-hot, text) is reduced to one vector."""

    MEAN = "mean"
    SUM = "sum"


class NumericTransform(str, enum.Enum):
    """How a numeric column is turned into model input."""

    NONE = "none"
    STANDARDIZE = "standardize"
    LOG = "log"  # log1p(max(x, 0)) then standardised
    BUCKETIZE = "bucketize"


def kind_spec(kind: str) -> KindSpec:
    """The registry entry of a feature kind (an enum member or its value).

    Raises:
        ValueError: the kind is not registered; the message lists the registered kinds.
    """
    # Imported here, not at load time: the kind modules build FeatureState (import cycle).
    from pipeline.features import spec_of

    return spec_of(kind)


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
        object.__setattr__(self, "type", kind_spec(self.type).kind)
        if self.pooling is not None:
            object.__setattr__(self, "pooling", Pooling(self.pooling))
        if self.transform is not None:
            object.__setattr__(self, "transform", NumericTransform(self.transform))

    @property
    def spec(self) -> KindSpec:
        """The registry entry of this feature's kind."""
        return kind_spec(self.type)

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

    def vocab_index(self) -> VocabIndex:
        """The vocabulary's lookup table, built once per state object (serving's path)."""
        index = self.__dict__.get("_vocab_index")
        if index is None:
            from pipeline.transforms import VocabIndex  # transforms imports this module

            index = VocabIndex(self.vocab_array())
            object.__setattr__(self, "_vocab_index", index)
        return index


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


def fit_feature(feat: FeatureConfig, values: pa.Array | None) -> FeatureState:
    """Fit one feature through its kind's registry entry.

    Args:
        feat: the feature's config.
        values: the prepared column: flattened lists for bags, tokens for text, item ids
            for a sequence (see ``KindSpec.fit_column`` for the raw column).
    """
    return kind_spec(feat.type).fit(feat, values)
