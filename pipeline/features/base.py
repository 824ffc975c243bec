"""What every feature kind provides: its config base, its model-input form, its spec.

A kind is one :class:`KindSpec` in :data:`REGISTRY`, keyed by its kind enum member. The
config section, the prepare step, the transforms, the Arrow type checks, the towers and
serving all look a feature's kind up there, so a new kind is one module and one entry.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from pipeline.kinds import register_member
from pipeline.state import FeatureState
from pipeline.strict import StrictModel

Encoded = dict[str, np.ndarray]  # model input key -> [B, ...] array


class InputForm(str, enum.Enum):
    """The model input a kind produces; ``towers`` maps each form to one encoder module."""

    ID = "id"  # [B] int64 row of a num_embeddings x embedding_dim table
    BAG = "bag"  # [B, max_length] int64 ids, post-padded, reduced by `pooling`
    VALUE = "value"  # [B] float32 value or int64 bucket (+ [B] float32 `NAME__missing`)
    VECTOR = "vector"  # [B, dim] float32
    SEQUENCE = "sequence"  # [B, max_length] int64 history ids, pre-padded (+ item features)


class FeatureConfig(StrictModel):
    """Fields every feature config has; each kind's config adds ``type`` and its own."""

    name: str = Field(description="Feature name: the model input key. Unique within a tower.")
    column: str | None = Field(
        default=None, description="Source column in the tower's table; defaults to `name`."
    )

    @property
    def source(self) -> str:
        """The column the feature is read from."""
        return self.column or self.name


def _as_is(column: pa.Array) -> pa.Array:
    return column


@dataclass(frozen=True)
class RequestTypes:
    """The JSON value types a serving contract builds a kind's request type from."""

    key: Any  # an id or category: integer, string or bool
    text: Any  # a bounded string
    number: Any  # a finite number
    max_values: int  # the longest list a request may send


@dataclass(frozen=True)
class KindSpec:
    """One feature kind: its config, fit, encode, type check and serving pieces.

    Attributes:
        kind: the registry key, a :class:`FeatureKind` member (an extension kind: a member
            of its own str-Enum); its value is the config's ``type``.
        config: the pydantic config model; its ``type`` field defaults to ``kind``'s value.
        form: the model input the encoded columns make.
        fit: (config, prepared values [N] or None) -> fitted state.
        encode: (raw column [B], state, feature name) -> ``{input key: [B, ...] array}``.
        null_array: state -> one-row null of the raw type the kind encodes from.
        raw_value: (non-null raw JSON value, state) -> one-row Arrow array to encode.
        accepts: Arrow type of a table column -> whether the kind reads it; None for a kind
            not read from a table column (a sequence is built from the interactions).
        accepted: the accepted Arrow types in words, for error messages.
        fit_input: raw column -> the values ``fit`` learns from (tokens, flattened lists).
        request: (state, request types) -> the JSON type of the value a request may send
            for the feature; None: any value (checked when encoded).
        filterable: whether a request may filter items by the feature's values.
    """

    kind: enum.Enum
    config: type[FeatureConfig]
    form: InputForm
    fit: Callable[[Any, pa.Array | None], FeatureState]
    encode: Callable[[Any, FeatureState, str], Encoded]
    null_array: Callable[[FeatureState], pa.Array]
    raw_value: Callable[[Any, FeatureState], pa.Array]
    accepts: Callable[[pa.DataType], bool] | None = None
    accepted: str = ""
    fit_input: Callable[[pa.Array], pa.Array] = _as_is
    request: Callable[[FeatureState, RequestTypes], Any] | None = None
    filterable: bool = False

    def __post_init__(self) -> None:
        tag = self.config.model_fields["type"].default
        if tag != self.kind.value:
            raise ValueError(f"kind {self.kind.value!r}: config {self.config.__name__}.type "
                             f"defaults to {tag!r}; it must be {self.kind.value!r}")

    @property
    def table_column(self) -> bool:
        """Whether the feature is read from a column of its tower's table."""
        return self.accepts is not None

    def fit_column(self, feat: Any, column: pa.Array) -> FeatureState:
        """Fit on a raw column: ``fit(feat, fit_input(column))``."""
        return self.fit(feat, self.fit_input(column))

    def raw_array(self, value: Any, state: FeatureState) -> pa.Array:
        """One raw JSON value (None: null) as the one-row array the kind encodes from.

        Raises:
            TypeError / ValueError / pyarrow.ArrowException: the value does not fit the kind.
        """
        return self.null_array(state) if value is None else self.raw_value(value, state)


class Registry(dict):
    """Kind enum member -> :class:`KindSpec`; an entry also makes its member known by value.

    A fitted state turns the kind value its JSON holds back into the member through
    :func:`pipeline.kinds.kind_member`, which knows a kind once it is registered here (the
    built-ins by this package, an extension kind by ``REGISTRY[member] = spec``).
    """

    def __setitem__(self, kind: enum.Enum, spec: KindSpec) -> None:
        register_member(kind)
        super().__setitem__(kind, spec)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Each entry through :meth:`__setitem__`."""
        for kind, spec in dict(*args, **kwargs).items():
            self[kind] = spec


REGISTRY: Registry = Registry()  # filled with the built-in kinds by the package


def spec_of(kind: str) -> KindSpec:
    """The registry entry of a kind, given its enum member or its value.

    Raises:
        ValueError: the kind is not registered; the message lists the registered kinds.
    """
    spec = REGISTRY.get(kind)  # str-Enum members hash and compare as their values
    if spec is None:
        raise ValueError(f"feature type {kind!r} is not registered; accepted: "
                         f"{[k.value for k in REGISTRY]}")
    return spec


def one_row(value: Any, state: FeatureState, takes_list: bool,
            typ: pa.DataType | None = None) -> pa.Array:
    """A non-null raw JSON value as a one-row array; lists only for kinds that take them.

    Args:
        value: the raw value.
        state: the feature's fitted state (its kind names the error).
        takes_list: whether the kind's raw value is a list.
        typ: the Arrow type to build; None infers it from the value.

    Raises:
        ValueError: a list for a single-value kind, or a single value for a list kind.
    """
    is_list = isinstance(value, list)
    if takes_list and not is_list:
        raise ValueError(f"a {state.type.value} feature takes a list, got "
                         f"{type(value).__name__}")
    if is_list and not takes_list:
        raise ValueError(f"a {state.type.value} feature takes a single value, not a list")
    return pa.array([value], typ)


def is_scalar_key(typ: pa.DataType) -> bool:
    """Integer or string: the types of a key or an id column."""
    return pa.types.is_integer(typ) or pa.types.is_string(typ) or pa.types.is_large_string(typ)


def is_list_of(typ: pa.DataType, *value_checks: Callable[[pa.DataType], bool]) -> bool:
    """A (large / fixed-size) list whose value type passes one of ``value_checks``."""
    t = pa.types
    listy = t.is_list(typ) or t.is_large_list(typ) or t.is_fixed_size_list(typ)
    return listy and any(check(typ.value_type) for check in value_checks)
