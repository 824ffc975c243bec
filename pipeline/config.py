"""Typed experiment config: one YAML file per experiment, validated at the edge.

The file has a ``data`` section (where the three Parquet tables are and which columns
are the keys), a ``features`` section (one typed entry per tower input) and a ``prepare``
section (how the split and the fitted state are produced). Later sections (model, train,
index, serve) are added by the packages that own them. Every model forbids unknown keys,
so a typo is an error that names the key.

Overrides use dotted paths, e.g. ``--set data.root=/data/ml100k``, ``--set
features.user.0.min_count=5``, and are applied to the raw mapping before validation.
"""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, model_validator

from pipeline.config_model import (
    Aggregation,
    LossConfig,
    ModelConfig,
    StrictModel,
    TowerConfig,
    TowerType,
)
from pipeline.config_run import IndexConfig, ServeConfig, TrainConfig


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


class NullFill(str, enum.Enum):
    """Which value replaces a null numeric before the transform."""

    MEAN = "mean"
    MEDIAN = "median"
    ZERO = "zero"


class _FeatureBase(StrictModel):
    name: str = Field(description="Feature name: the model input key. Unique within a tower.")
    column: str | None = Field(
        default=None, description="Source column in the tower's table; defaults to `name`."
    )

    @property
    def source(self) -> str:
        """The column the feature is read from."""
        return self.column or self.name


class CategoricalFeature(_FeatureBase):
    """A single value per row (ids included) mapped to an embedding row."""

    type: Literal["categorical"] = "categorical"
    min_count: int = Field(default=1, ge=1, description="Values seen fewer times go to OOV.")
    max_vocab: int | None = Field(default=None, ge=1, description="Keep the most frequent N.")
    hash_buckets: int | None = Field(
        default=None, ge=1, description="Hash values into N buckets instead of a vocabulary."
    )
    embedding_dim: int = Field(default=16, ge=1, description="Embedding width.")

    @model_validator(mode="after")
    def _hash_or_vocab(self) -> CategoricalFeature:
        if self.hash_buckets is not None and (self.min_count != 1 or self.max_vocab):
            raise ValueError(
                f"feature {self.name!r}: hash_buckets={self.hash_buckets} cannot be combined "
                f"with min_count={self.min_count} or max_vocab={self.max_vocab} (no vocabulary "
                "is fitted when hashing)"
            )
        return self


class MultiHotFeature(_FeatureBase):
    """A list column (e.g. genres, tags): a bag of vocabulary ids, padded to max_length."""

    type: Literal["multi_hot"] = "multi_hot"
    min_count: int = Field(default=1, ge=1, description="Values seen fewer times go to OOV.")
    max_length: int = Field(default=8, ge=1, description="Values kept per row (padded with 0).")
    embedding_dim: int = Field(default=16, ge=1, description="Embedding width.")
    pooling: Pooling = Field(default=Pooling.MEAN, description="Bag pooling.")


class TextFeature(_FeatureBase):
    """A string column tokenised (lower-cased, split on non-alphanumerics) into token ids."""

    type: Literal["text"] = "text"
    min_count: int = Field(default=2, ge=1, description="Tokens seen fewer times go to OOV.")
    max_tokens: int = Field(default=16, ge=1, description="Tokens kept per row.")
    max_vocab: int | None = Field(default=50_000, ge=1, description="Keep the most frequent N.")
    embedding_dim: int = Field(default=16, ge=1, description="Embedding width.")
    pooling: Pooling = Field(default=Pooling.MEAN, description="Bag pooling.")


class NumericFeature(_FeatureBase):
    """A scalar column: standardised, log-scaled or bucketised; nulls filled and flagged."""

    type: Literal["numeric"] = "numeric"
    transform: NumericTransform = Field(default=NumericTransform.STANDARDIZE)
    num_buckets: int = Field(default=10, ge=2, description="Quantile buckets for bucketize.")
    boundaries: list[float] | None = Field(
        default=None, description="Explicit sorted bucket boundaries (bucketize only)."
    )
    fill: NullFill = Field(default=NullFill.MEAN, description="Replacement for nulls.")
    missing_indicator: bool = Field(default=True, description="Add a 0/1 null flag input.")
    embedding_dim: int = Field(default=8, ge=1, description="Embedding width (bucketize).")

    @model_validator(mode="after")
    def _boundaries_need_bucketize(self) -> NumericFeature:
        if self.boundaries is not None:
            if self.transform is not NumericTransform.BUCKETIZE:
                raise ValueError(
                    f"feature {self.name!r}: boundaries are only used with transform=bucketize, "
                    f"not transform={self.transform.value}"
                )
            if list(self.boundaries) != sorted(set(self.boundaries)):
                raise ValueError(f"feature {self.name!r}: boundaries must be strictly increasing")
        return self


class DenseVectorFeature(_FeatureBase):
    """A fixed-length pretrained embedding column (list<float> of length `dim`)."""

    type: Literal["dense_vector"] = "dense_vector"
    dim: int = Field(ge=1, description="Expected vector length; other lengths are an error.")


class SequenceFeature(_FeatureBase):
    """The user's most recent item ids, derived from the interactions (user tower only)."""

    type: Literal["sequence"] = "sequence"
    max_length: int = Field(default=50, ge=1, description="Most recent items kept.")
    item_features: list[str] = Field(
        default_factory=list,
        description="Categorical item-tower features also looked up for each history item.",
    )
    embedding_dim: int = Field(default=32, ge=1, description="Item embedding width.")


Feature = Annotated[
    Union[
        CategoricalFeature,
        MultiHotFeature,
        TextFeature,
        NumericFeature,
        DenseVectorFeature,
        SequenceFeature,
    ],
    Field(discriminator="type"),
]


class FeaturesConfig(StrictModel):
    """The inputs of each tower."""

    user: list[Feature] = Field(description="User-tower features (from users + interactions).")
    item: list[Feature] = Field(description="Item-tower features (from the item table).")

    @model_validator(mode="after")
    def _check(self) -> FeaturesConfig:
        for tower, feats in (("user", self.user), ("item", self.item)):
            names = [f.name for f in feats]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"features.{tower}: duplicate feature names {dup}")
            if not feats:
                raise ValueError(f"features.{tower}: at least one feature is required")
        for f in self.item:
            if isinstance(f, SequenceFeature):
                raise ValueError(
                    f"features.item: {f.name!r} is a sequence feature; sequences are built "
                    "from a user's interactions and belong to features.user"
                )
        item_cats = {f.name for f in self.item if isinstance(f, CategoricalFeature)}
        for f in self.user:
            if isinstance(f, SequenceFeature):
                missing = [n for n in f.item_features if n not in item_cats]
                if missing:
                    raise ValueError(
                        f"features.user: sequence {f.name!r} item_features {missing} are not "
                        f"categorical item features; accepted: {sorted(item_cats)}"
                    )
        return self


class DataConfig(StrictModel):
    """Where the three Parquet inputs are and what their key columns are called."""

    root: str | None = Field(
        default=None, description="Base for relative table paths (the one field to override)."
    )
    interactions: str = Field(description="File, folder or glob; local or s3://, gs://, ...")
    users: str = Field(description="File, folder or glob of the user table.")
    items: str = Field(description="File, folder or glob of the item table (the catalogue).")
    user_id: str = Field(default="user_id", description="User key column (all tables).")
    item_id: str = Field(default="item_id", description="Item key column (all tables).")
    timestamp: str = Field(default="timestamp", description="Interaction time column.")
    weight: str | None = Field(default=None, description="Optional interaction weight column.")

    def resolve(self, path: str) -> str:
        """Join a table path with `root` unless it is absolute or a URI."""
        if self.root is None or "://" in path or os.path.isabs(path):
            return path
        if "://" in self.root:
            return self.root.rstrip("/") + "/" + path
        return str(Path(self.root) / path)


class PrepareConfig(StrictModel):
    """How the prepare job splits and writes."""

    min_user_interactions: int = Field(
        default=3, ge=1, description="Users with fewer interactions are dropped entirely."
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per Ray Data transform task.")
    rows_per_file: int = Field(default=1_000_000, ge=1000, description="Output file size.")


class Config(StrictModel):
    """A whole experiment config. Sections added by later packages live here too."""

    data: DataConfig
    features: FeaturesConfig
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _model_matches_features(self) -> Config:
        for tower in ("user", "item"):
            _check_tower(tower, getattr(self.model, tower), getattr(self.features, tower),
                         self.data.user_id if tower == "user" else self.data.item_id)
        item_id = [f for f in self.features.item
                   if isinstance(f, CategoricalFeature) and f.source == self.data.item_id]
        if self.model.tie_sequence_embedding is True and item_id:
            for f in self.features.user:
                if isinstance(f, SequenceFeature) and f.embedding_dim != item_id[0].embedding_dim:
                    raise ValueError(
                        f"model.tie_sequence_embedding=true needs features.user {f.name!r} "
                        f"embedding_dim={f.embedding_dim} to equal features.item "
                        f"{item_id[0].name!r} embedding_dim={item_id[0].embedding_dim}")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able mapping (enums as values), for artifacts."""
        return self.model_dump(mode="json")


def _check_tower(tower: str, tc: TowerConfig, feats: list, key: str) -> None:
    """Cross-check one tower's model section against its features."""
    names = [f.name for f in feats]
    used = tc.features if tc.features is not None else names
    unknown = [n for n in used if n not in names]
    if unknown:
        raise ValueError(f"model.{tower}.features {unknown} are not in features.{tower}; "
                         f"accepted: {names}")
    seqs = [f.name for f in feats if isinstance(f, SequenceFeature) and f.name in used]
    if tc.type in (TowerType.TRANSFORMER, TowerType.CNN):
        body = tc.transformer if tc.type is TowerType.TRANSFORMER else tc.cnn
        wanted = body.sequence or (seqs[0] if len(seqs) == 1 else None)
        if wanted not in seqs:
            raise ValueError(
                f"model.{tower}.type={tc.type.value} needs one sequence feature to run over "
                f"(set model.{tower}.{tc.type.value}.sequence); sequences in this tower: {seqs}")
    if tc.type is TowerType.FUSION:
        grouped = [n for g in tc.fusion.groups.values() for n in g]
        bad = [n for n in grouped if n not in used]
        if bad:
            raise ValueError(f"model.{tower}.fusion.groups name {bad}, which are not features "
                             f"of this tower; accepted: {used}")
    if tc.aggregation is Aggregation.SUM_ITEM_MULTIPLY and not any(
            isinstance(f, CategoricalFeature) and f.source == key and f.name in used
            for f in feats):
        raise ValueError(f"model.{tower}.aggregation=sum_item_multiply needs the id feature "
                         f"on column {key!r} among the tower's features")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a raw config mapping.

    List elements are addressed by index (``features.user.0.min_count=5``).
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.field=value")
        node: Any = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: i + 1]), create=True)
        last = parts[-1]
        value = yaml.safe_load(text)
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        else:
            node[last] = value
    return raw


def _index(node: list, part: str, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"override path {path!r}: {part!r} is not an index below {len(node)}")
    return int(part)


def _child(node: Any, part: str, path: str, create: bool) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if not isinstance(node, dict):
        raise ValueError(f"override path {path!r} goes through a value, not a section")
    if part not in node and create:
        node[part] = {}
    return node[part]


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply overrides and validate it.

    Raises:
        ValueError: naming the file and every invalid key with what is accepted.
    """
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a raw mapping; errors name each key path and the problem."""
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"  {loc or '<top>'}: {e['msg']}")
        raise ValueError(f"{source}: invalid config\n" + "\n".join(lines)) from None
