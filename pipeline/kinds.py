"""The feature-kind enums and the kind members by value (a leaf module: imports nothing here).

A fitted state names its kind by an enum member; JSON holds the member's value.
:func:`kind_member` turns a value back into its member for the built-in kinds and for every
extension kind registered in :data:`pipeline.features.REGISTRY` (which calls
:func:`register_member`), without the state importing the kinds' modules.
"""

from __future__ import annotations

import enum


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


MEMBERS: dict[str, enum.Enum] = {k.value: k for k in FeatureKind}  # value -> member


def register_member(member: enum.Enum) -> None:
    """Make an extension kind's enum member known by its value."""
    MEMBERS[member.value] = member


def kind_member(kind: str | enum.Enum) -> enum.Enum:
    """The enum member of a kind, given the member or its value.

    Raises:
        ValueError: no such kind; the message lists the known kinds.
    """
    member = MEMBERS.get(kind.value if isinstance(kind, enum.Enum) else kind)
    if member is None:
        raise ValueError(f"feature type {kind!r} is not registered; accepted: "
                         f"{list(MEMBERS)}")
    return member
