"""The per-run part of the request contract: which ``features`` and ``filter`` keys exist.

A request's ``features`` are keyed by the run's user-feature source columns and its
``filter`` by the run's filterable item features (categorical and multi-hot ones with a
vocabulary, the id excepted). Both depend on the run being served, which a rollout can
change, so they are pydantic models built per run (:class:`RunContract`): the same model
validates the request and writes its part of ``/openapi.json``.

One JSON type per feature kind:

===============  ===========================================  ==========================
kind             value                                        null
===============  ===========================================  ==========================
categorical      boolean, int64 or string                     padding / the null row
multi_hot        list of boolean, int64 or string             empty bag
text             string                                       no tokens
numeric          number (finite)                              fill value, missing flag
dense_vector     list of exactly ``dim`` numbers              zeros
===============  ===========================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictStr,
    ValidationError,
    create_model,
)

from pipeline.config.serve import ServeConfig
from pipeline.features import RequestTypes, spec_of
from pipeline.state import FeatureState, TowerState
from serve_app.request_errors import merge_errors
from serve_app.schemas import Int64, no_null_defaults


class ContractError(ValueError):
    """A request part the run's contract refuses; ``errors`` in the 422 shape."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__("; ".join(e["msg"] for e in errors))
        self.errors = errors


def _value_type(state: FeatureState, cfg: ServeConfig) -> Any:
    """The JSON value type of one user feature (see the module table); None: any."""
    text = Annotated[StrictStr, Field(max_length=cfg.max_string_length)]
    key = Union[StrictBool, Int64, text]
    number = Annotated[Union[Int64, StrictFloat], Field(allow_inf_nan=False)]
    request = spec_of(state.type).request  # each kind's module says what it takes
    return request(state, RequestTypes(key, text, number, cfg.max_values)) if request else Any


def filterable(tower: TowerState, id_features: list[str]) -> dict[str, FeatureState]:
    """The item features a filter may name: categorical / multi-hot with a vocabulary."""
    return {name: st for name, st in tower.features.items()
            if spec_of(st.type).filterable and st.vocab is not None
            and name not in id_features}


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


@dataclass(frozen=True)
class RunContract:
    """The ``features`` and ``filter`` models of one run.

    Args:
        sources: user source column -> the feature states read from it (id features and
            sequences excluded: they come from ``user_id`` and ``history``).
        attributes: filterable item feature name -> its state.
        cfg: the deployment's serve config (string and list bounds).
    """

    features: type[BaseModel]
    filter: type[BaseModel]

    @classmethod
    def build(cls, sources: dict[str, list[FeatureState]],
              attributes: dict[str, FeatureState], cfg: ServeConfig) -> RunContract:
        """Build both models from the run's fitted state."""
        feature_fields = {src: (_value_type(states[0], cfg) | None, None)
                          for src, states in sources.items()}
        value = Union[StrictBool, Int64,
                      Annotated[StrictStr, Field(max_length=cfg.max_string_length)]]
        values = Annotated[list[value], Field(max_length=cfg.max_values)]
        filter_fields = {name: (values, None) for name in attributes}
        return cls(create_model("RunFeatures", __base__=_Part, **feature_fields),
                   create_model("RunFilter", __base__=_Part, **filter_fields))

    def check_features(self, features: dict[str, Any]) -> None:
        """Raise :class:`ContractError` unless ``features`` fit the run's user columns."""
        self._check(self.features, features, "features", "a user feature column")

    def check_filter(self, filter_: dict[str, Any]) -> None:
        """Raise :class:`ContractError` unless ``filter`` names filterable attributes."""
        self._check(self.filter, filter_, "filter", "a filterable item feature")

    @staticmethod
    def _check(model: type[BaseModel], body: dict[str, Any], field: str, what: str) -> None:
        try:
            model.model_validate(body)
        except ValidationError as err:
            errors = merge_errors(err.errors(), ("body", field))
            for e in errors:
                name = ".".join(map(str, e["loc"][1:]))
                e["msg"] = (f"{name} is not {what} of the run being served; accepted: "
                            f"{sorted(model.model_fields)}" if e["type"] == "extra_forbidden"
                            else f"{name}: {e['msg']}")
            raise ContractError(errors) from None

    def openapi(self) -> dict[str, dict[str, Any]]:
        """The run's JSON schemas of ``features`` and ``filter`` (no ``$defs`` needed)."""
        out = {}
        for name, model in (("features", self.features), ("filter", self.filter)):
            schema = model.model_json_schema()
            schema.pop("title", None)
            no_null_defaults(schema)
            for prop in schema.get("properties", {}).values():
                prop.pop("title", None)
            out[name] = schema
        return out
