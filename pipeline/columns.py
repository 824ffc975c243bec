"""Column names of the prepared tables: the one place they are spelled.

A prepared split row carries the raw keys (:data:`USER_KEY`, :data:`ITEM_KEY`), the
interaction's :data:`TIMESTAMP` and :data:`WEIGHT`, its catalogue row :data:`ITEM_INDEX`
and every encoded feature of both towers as ``user__NAME`` / ``item__NAME`` (plus
``user__NAME__SUFFIX`` for a feature's extra inputs, e.g. ``__missing`` or a history's
item feature). A tower reads the columns of its prefix with the prefix removed
(:func:`tower_inputs`); that key is what the model's ``input_spec`` lists.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

USER, ITEM = "user", "item"
TOWERS = (USER, ITEM)
USER_KEY, ITEM_KEY = "user_id", "item_id"  # raw keys in the prepared splits
TIMESTAMP, WEIGHT = "timestamp", "weight"
ITEM_INDEX = "item_index"  # catalogue row of the interaction's item
IMPRESSIONS = "impressions"  # [L] catalogue rows shown but not clicked (-1 = padding)
SEEN = "seen_item_index"  # users.parquet: every catalogue row the user interacted with
# prepared/sequences/: each window's catalogue rows [L + 1] (-1 = padding), their weights
# and their timestamps (the int64 minimum at padding)
SEQUENCE_ITEMS, SEQUENCE_WEIGHTS = "sequence_item_index", "sequence_weight"
SEQUENCE_TIMES = "sequence_timestamp"
MISSING = "missing"  # suffix of a numeric feature's null flag

V = TypeVar("V")


def prefix(tower: str) -> str:
    """Column prefix of a tower's encoded features (``user__``)."""
    return f"{tower}__"


def input_key(feature: str, suffix: str | None = None) -> str:
    """A tower input key, e.g. ``age__missing`` or ``history__genre``."""
    return f"{feature}__{suffix}" if suffix else feature


def column_name(tower: str, feature: str, suffix: str | None = None) -> str:
    """Name of a transformed column in prepared Parquet, e.g. ``user__age__missing``."""
    return prefix(tower) + input_key(feature, suffix)


def prefixed(tower: str, inputs: Mapping[str, V]) -> dict[str, V]:
    """Tower input keys -> prepared column names (``age`` -> ``user__age``)."""
    p = prefix(tower)
    return {p + k: v for k, v in inputs.items()}


def tower_inputs(batch: Mapping[str, V], tower: str) -> dict[str, V]:
    """A tower's inputs from a batch of prepared columns (prefix removed)."""
    p = prefix(tower)
    return {k[len(p):]: v for k, v in batch.items() if k.startswith(p)}


def tower_columns(names: list[str], tower: str) -> list[str]:
    """The columns among ``names`` that belong to ``tower``."""
    return [c for c in names if c.startswith(prefix(tower))]


def model_columns(names: list[str]) -> list[str]:
    """The columns a training batch needs: both towers' features, item index, weight.

    For a sequence window: the user tower's columns, its items and their weights.
    """
    extra = (ITEM_INDEX, WEIGHT, IMPRESSIONS, SEQUENCE_ITEMS, SEQUENCE_WEIGHTS, SEQUENCE_TIMES)
    return [c for c in names if c.startswith((prefix(USER), prefix(ITEM))) or c in extra]
