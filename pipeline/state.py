"""Fitted feature state: vocabularies and statistics, stored as JSON (never pickle).

:func:`fit_feature` learns one feature's state from a column. The prepare job calls it
with training interactions for id columns and with the user / item tables for metadata,
so nothing is learned from validation or test targets. Vocabularies are ordered by count
(descending) then value, which makes the state identical across runs on the same input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import config as C

STATE_VERSION = 1
RESERVED = 2  # index 0 = padding / null, 1 = out of vocabulary


@dataclass(frozen=True)
class FeatureState:
    """Everything a transform and an embedding table need to know about one feature."""

    type: str
    source: str
    num_embeddings: int = 0  # rows of the embedding table (0: no table)
    embedding_dim: int = 0
    vocab: list[Any] | None = None
    vocab_type: str | None = None  # "int64" | "string"
    hash_buckets: int | None = None
    max_length: int = 0
    pooling: str | None = None
    transform: str | None = None
    mean: float = 0.0
    std: float = 1.0
    fill_value: float = 0.0
    boundaries: list[float] | None = None
    missing_indicator: bool = False
    dim: int = 0
    item_features: list[str] = field(default_factory=list)
    vocab_of: str | None = None  # sequence: name of the item feature whose vocab it shares

    def vocab_array(self) -> pa.Array:
        """The vocabulary as a typed pyarrow array (for ``pc.index_in``)."""
        if self.vocab is None:
            raise ValueError(f"feature on column {self.source!r} has no vocabulary")
        arr = self.__dict__.get("_vocab_array")
        if arr is None:  # built once per state object; transforms call this per batch
            typ = pa.int64() if self.vocab_type == "int64" else pa.string()
            arr = pa.array(self.vocab, typ)
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
        """Deterministic JSON text (sorted keys)."""
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


def fit_feature(feat: C.Feature, values: pa.Array | None) -> FeatureState:
    """Fit one non-sequence feature on a column (flattened lists for bags, tokens for text)."""
    base = {"type": feat.type, "source": feat.source}
    if isinstance(feat, C.CategoricalFeature):
        if feat.hash_buckets:
            return FeatureState(**base, hash_buckets=feat.hash_buckets,
                                num_embeddings=feat.hash_buckets + RESERVED,
                                embedding_dim=feat.embedding_dim)
        vocab, vtype = fit_vocab(values, feat.min_count, feat.max_vocab)
        return FeatureState(**base, vocab=vocab, vocab_type=vtype,
                            num_embeddings=len(vocab) + RESERVED, embedding_dim=feat.embedding_dim)
    if isinstance(feat, (C.MultiHotFeature, C.TextFeature)):
        max_vocab = getattr(feat, "max_vocab", None)
        vocab, vtype = fit_vocab(values, feat.min_count, max_vocab)
        length = feat.max_length if isinstance(feat, C.MultiHotFeature) else feat.max_tokens
        return FeatureState(**base, vocab=vocab, vocab_type=vtype, max_length=length,
                            num_embeddings=len(vocab) + RESERVED, pooling=feat.pooling.value,
                            embedding_dim=feat.embedding_dim)
    if isinstance(feat, C.NumericFeature):
        return _fit_numeric(feat, values, base)
    if isinstance(feat, C.DenseVectorFeature):
        return FeatureState(**base, dim=feat.dim)
    raise TypeError(f"fit_feature does not fit {type(feat).__name__}")


def _fit_numeric(feat: C.NumericFeature, values: pa.Array, base: dict) -> FeatureState:
    x = pc.cast(values, pa.float64()).drop_null().to_numpy(zero_copy_only=False)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        raise ValueError(f"numeric feature {feat.name!r}: column {feat.source!r} has no values")
    fill = {C.NullFill.MEAN: float(np.mean(x)), C.NullFill.MEDIAN: float(np.median(x)),
            C.NullFill.ZERO: 0.0}[feat.fill]
    filled = np.concatenate([x, np.full(len(values) - len(x), fill)])
    common = {"transform": feat.transform.value, "fill_value": fill,
              "missing_indicator": feat.missing_indicator}
    if feat.transform is C.NumericTransform.BUCKETIZE:
        bounds = feat.boundaries or _quantile_bounds(filled, feat.num_buckets)
        return FeatureState(**base, **common, boundaries=[float(b) for b in bounds],
                            num_embeddings=len(bounds) + 2, embedding_dim=feat.embedding_dim)
    if feat.transform is C.NumericTransform.LOG:
        filled = np.log1p(np.maximum(filled, 0.0))
    std = float(np.std(filled))
    return FeatureState(**base, **common, mean=float(np.mean(filled)),
                        std=std if std > 0 else 1.0)


def _quantile_bounds(x: np.ndarray, buckets: int) -> list[float]:
    qs = np.quantile(x, np.linspace(0, 1, buckets + 1)[1:-1])
    return sorted(set(float(q) for q in qs))


def sequence_state(feat: C.SequenceFeature, item_ids: pa.Array, item_tower: TowerState,
                   item_id_column: str) -> FeatureState:
    """A sequence shares the vocabulary of the item tower's id feature when there is one.

    Sharing makes the history ids and the item tower's id embedding index the same rows,
    which is what tying the two embeddings needs.
    """
    for name, st in item_tower.features.items():
        if st.type == "categorical" and st.source == item_id_column and st.vocab is not None:
            return FeatureState(type="sequence", source=feat.name, vocab=st.vocab,
                                vocab_type=st.vocab_type, num_embeddings=st.num_embeddings,
                                max_length=feat.max_length, embedding_dim=feat.embedding_dim,
                                item_features=list(feat.item_features), vocab_of=name)
    vocab, vtype = fit_vocab(item_ids, 1, None)
    return FeatureState(type="sequence", source=feat.name, vocab=vocab, vocab_type=vtype,
                        num_embeddings=len(vocab) + RESERVED, max_length=feat.max_length,
                        embedding_dim=feat.embedding_dim, item_features=list(feat.item_features))
