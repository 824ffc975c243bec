"""The ``features`` section: one typed entry per tower input."""

from __future__ import annotations

import enum
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel


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
