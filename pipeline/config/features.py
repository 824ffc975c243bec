"""The ``features`` section: one typed entry per tower input.

Each kind's config model lives in its module under :mod:`pipeline.features` and is
re-exported here. An entry is validated as the model its ``type`` names in the kind
registry, so registering a kind adds it to this section.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Union

from pydantic import Field, PlainValidator, SerializeAsAny, TypeAdapter, model_validator

from pipeline.features.base import REGISTRY, FeatureConfig
from pipeline.features.categorical import CategoricalFeature
from pipeline.features.dense_vector import DenseVectorFeature
from pipeline.features.multi_hot import MultiHotFeature
from pipeline.features.numeric import NullFill, NumericFeature
from pipeline.features.sequence import SequenceFeature
from pipeline.features.text import TextFeature
from pipeline.state import NumericTransform, Pooling
from pipeline.strict import StrictModel

__all__ = [
    "CategoricalFeature", "DenseVectorFeature", "Feature", "FeatureConfig", "FeaturesConfig",
    "MultiHotFeature", "NullFill", "NumericFeature", "NumericTransform", "Pooling",
    "SequenceFeature", "TextFeature",
]


@functools.lru_cache(maxsize=8)
def _union(configs: tuple[type[FeatureConfig], ...]) -> TypeAdapter:
    """The discriminated union of the registered configs: errors name the kind and field."""
    return TypeAdapter(Annotated[Union[configs], Field(discriminator="type")])


def _validate_feature(value: Any) -> FeatureConfig:
    """One feature entry as the config model of the kind its ``type`` names."""
    return _union(tuple(spec.config for spec in REGISTRY.values())).validate_python(value)


# Any registered kind's config; dumped with its own fields, not only the base's.
Feature = Annotated[SerializeAsAny[FeatureConfig], PlainValidator(_validate_feature)]


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
