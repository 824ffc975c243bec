"""Request and response bodies of the retrieval endpoint, and the errors it answers with.

Raw ids (users and items) are JSON integers (int64) or strings, as in the source tables; a
request's ``features`` are raw values keyed by the user feature's *source column* (the
same names as the users table), encoded on the server by ``pipeline.transforms``.

Every bound a request can exceed comes from the deployment's ``ServeConfig`` and is part
of the schema (``maximum``, ``maxItems``, ``maxLength``), so the OpenAPI document at
``/openapi.json`` is the contract the server enforces: :func:`request_models` builds the
request classes of one config; the module-level classes are those of the defaults (the
in-process API and tests use them). Types are strict: ``exclude_seen: 0`` or ``k: "10"``
are 422s, as the schema says.

The per-run parts (which ``features`` columns, which ``filter`` attributes) are checked
against the loaded run by :mod:`serve_app.contract`. Every 4xx body has one shape:
``{"detail": [{"type", "loc", "msg", "input"}]}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from pipeline.config.serve import ServeConfig

# Integer ids are JSON-safe integers, |id| <= 2**53 - 1: every JSON tool holds them exactly
# (numbers are doubles to many of them). Send a larger integer id as a string: "7" finds
# the integer key 7, by the one lookup rule (pipeline.transforms.cast_like).
ID_MIN, ID_MAX = -(2**53 - 1), 2**53 - 1


def _integral(value: Any) -> Any:
    """A JSON number with no fraction (``7.0``) is an integer, as JSON Schema says."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _one_or_many(value: Any) -> Any:
    """``POST /events`` takes one event object or a list of them: one is a list of one."""
    return [value] if isinstance(value, dict) else value


def integer(low: int, high: int) -> Any:
    """A JSON integer in ``low..high``: no bool, no "7"; 7.0 is 7 (bounds in the schema)."""
    return Annotated[StrictInt, Field(ge=low, le=high), BeforeValidator(_integral)]


Int64 = integer(ID_MIN, ID_MAX)  # an integer id or value: within JSON's exact range
Scalar = Union[StrictInt, StrictFloat, StrictStr, StrictBool, None]  # in-process API
FeatureValue = Union[Scalar, list[Scalar]]
RawId = Union[StrictInt, StrictStr]  # the Python type of an id once validated

EVENT_TIME_MAX = ID_MAX  # an event's integer time: within JSON's exact range, >= 0
ONE_OF_USER = ("user_id", "features", "history")
WHO_MSG = "at least one of user_id, features or history is required"


def no_null_defaults(schema: dict[str, Any]) -> None:
    """JSON schema: drop ``"default": null`` of fields whose type does not allow null.

    An absent optional field is not the same as an explicit null, which these fields
    refuse; a ``default`` the type forbids would invite clients (and fuzzers) to send it.
    """
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None and not _allows_null(prop):
            del prop["default"]


def _allows_null(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "null" or any(o.get("type") == "null"
                                             for o in prop.get("anyOf", []))


def _one_of_user(schema: dict[str, Any]) -> None:
    """JSON schema: the body names the user by at least one of the three fields."""
    no_null_defaults(schema)
    schema["anyOf"] = [{"required": [field]} for field in ONE_OF_USER]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=no_null_defaults)


class ScoredItem(_Strict):
    """One item and its score (inner product; cosine when the model normalises)."""

    item_id: RawId = Field(description="Raw item id.")
    score: float = Field(description="Similarity between the query and the item.")


class RecommendResponse(_Strict):
    """The best items first."""

    items: list[ScoredItem] = Field(description="At most k items, best first.")
    model_version: str = Field(description="Version of the model that answered.")
    state_version: int | None = Field(
        default=None, description="Events applied to the user's stored state since the run "
        "was prepared (0: as prepared); absent for a user the store does not hold.")


class SimilarItemsResponse(_Strict):
    """The nearest items first (the query item itself left out)."""

    items: list[ScoredItem] = Field(description="At most k items, nearest first.")
    model_version: str = Field(description="Version of the model that answered.")


class ScoreResponse(_Strict):
    """One score per requested item, in request order."""

    scores: list[ScoredItem] = Field(description="Scores in the order of item_ids.")
    model_version: str = Field(description="Version of the model that answered.")
    state_version: int | None = Field(
        default=None, description="Events applied to the user's stored state since the run "
        "was prepared (0: as prepared); absent for a user the store does not hold.")


class EventsResponse(_Strict):
    """``POST /events``: what was written (the log and the store hold it on a 2xx)."""

    accepted: int = Field(description="Events written to the events log.")
    in_history: int = Field(description="Events of catalogue items, appended to the users' "
                            "state (the rest are in the log only).")
    unknown_items: list[int] = Field(description="Positions of events whose item is not in "
                                     "the catalogue.")
    model_version: str = Field(description="Version of the model whose store took them.")


class HealthResponse(_Strict):
    """``GET /healthz``."""

    status: str = Field(description="'ok' while the replica answers.")
    model_version: str = Field(description="Version of the model being served.")


class IndexSummary(_Strict):
    """The parts of ``RUN_DIR/index/manifest.json`` a client may care about."""

    index_type: str = Field(description="FAISS factory string or 'exact'.")
    similarity: str = Field(description="dot or cosine.")
    dim: int = Field(description="Embedding width D.")
    item_count: int = Field(description="Items in the index.")
    params: dict[str, Any] = Field(description="Search parameters (nprobe, efSearch).")
    recall: dict[str, Any] = Field(description="recall@K of the index vs exact search.")


class RolloutStatus(_Strict):
    """Whether the last rollout loaded; the reason is in the replica's log, not here."""

    status: Literal["ok", "refused"] = Field(
        description="'refused': the last run_dir did not load and the previous run keeps "
        "serving.")
    refused_at: str | None = Field(default=None, description="UTC time of the refusal.")


class VersionResponse(_Strict):
    """``GET /version``: what is being served (no paths, no error text)."""

    model_version: str = Field(description="Content hash of the model weights.")
    feature_state_hash: str = Field(description="Hash of prepared/feature_state.json.")
    index: IndexSummary = Field(description="The index the model queries.")
    rollout: RolloutStatus = Field(
        default_factory=lambda: RolloutStatus(status="ok"),
        description="Status of the last rollout.")


class ErrorDetail(BaseModel):
    """One problem with a request."""

    type: str = Field(description="Machine-readable kind, e.g. 'unknown_item'.")
    loc: list[str | int] = Field(description="Path of the field, e.g. ['body', 'k'].")
    msg: str = Field(description="What is wrong and what is accepted.")
    input: Any = Field(default=None, description="The offending value (lists: a summary).")


class ErrorResponse(BaseModel):
    """The body of every 4xx answer."""

    detail: list[ErrorDetail]


class ReloadConfig(_Strict):
    """The deployment's ``user_config``: what ``reconfigure`` accepts."""

    model_config = ConfigDict(extra="forbid", strict=False)

    run_dir: str = Field(description="Run directory to serve (model/, index/, prepared/).")
    max_batch_size: int | None = Field(default=None, ge=1, description="Most requests per batch.")
    batch_wait_timeout_s: float | None = Field(
        default=None, ge=0, description="How long a batch waits for more requests, in seconds.")


@dataclass(frozen=True)
class RequestModels:
    """The request body classes of one ``ServeConfig`` (its bounds in their schema)."""

    recommend: type[BaseModel]
    similar_items: type[BaseModel]
    score: type[BaseModel]
    events: Any  # list[Event], one event object accepted as a list of one


def request_models(cfg: ServeConfig) -> RequestModels:  # noqa: C901 - one class per body
    """Request classes whose fields carry ``cfg``'s bounds (validation and JSON schema).

    Args:
        cfg: the deployment's serve config: max_k, max_history, max_exclude_items,
            max_allow_items, max_values, max_keys, max_string_length.
    """
    Str = Annotated[StrictStr, Field(max_length=cfg.max_string_length)]
    Id = Union[Int64, Str]
    K = integer(1, cfg.max_k)
    # features / filter values stay as sent: the run's contract (serve_app.contract)
    # validates them, with one JSON type per feature kind, and writes their schema
    RunPart = Annotated[dict[Str, Any], Field(max_length=cfg.max_keys)]

    class UserQuery(_Strict):
        """Who the user is: a known id, raw feature values, a history, or any mix of them."""

        model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_one_of_user)

        user_id: Id = Field(
            default=None, description="Raw user id. Known: its stored features, history and "
            "seen items are used; unknown: the out-of-vocabulary row (cold start).")
        features: RunPart = Field(
            default=None, description="Raw user feature values keyed by source column (e.g. "
            "{'age': 31, 'country': 'DE'}); they override the stored values. Unseen "
            "categories take the out-of-vocabulary row, null the padding / fill value. The "
            "columns and their types are those of the run being served; at most "
            f"{cfg.max_keys} keys (serve.max_keys).")
        history: Annotated[list[Id], Field(max_length=cfg.max_history)] = Field(
            default=None, description="Raw item ids the user interacted with, oldest first; "
            f"replaces the stored history (at most {cfg.max_history}, serve.max_history). "
            "Ids not in the catalogue are dropped, as training drops them.")

        @model_validator(mode="after")
        def _someone(self) -> UserQuery:
            if self.user_id is None and self.features is None and self.history is None:
                raise ValueError(WHO_MSG)
            return self

    class Retrieval(_Strict):
        """The fields that pick and restrict the items of an answer."""

        k: K = Field(default=10, description=f"Items to return, 1..{cfg.max_k} (serve.max_k).")
        exclude_items: Annotated[list[Id], Field(max_length=cfg.max_exclude_items)] = Field(
            default_factory=list, description="Raw item ids never to return (unknown ids "
            f"ignored); at most {cfg.max_exclude_items} (serve.max_exclude_items).")
        filter: RunPart = Field(
            default=None, description="Item attributes the answer must have: {attribute: "
            "[values]}, any of the values (OR) for every attribute given (AND), over the "
            "run's categorical and multi-hot item features. Exact: the top k among matching "
            "items. Values outside the attribute's vocabulary match nothing. At most "
            f"{cfg.max_keys} attributes (serve.max_keys).")
        allow_items: Annotated[list[Id], Field(max_length=cfg.max_allow_items)] = Field(
            default=None, description="Only these raw item ids may be returned (with "
            f"filter: both must hold); at most {cfg.max_allow_items} "
            "(serve.max_allow_items).")

    class RecommendRequest(Retrieval, UserQuery):
        """``POST /recommend``: the top ``k`` catalogue items for a user."""

        exclude_seen: StrictBool = Field(
            default=True, description="Leave out the user's stored seen items and the "
            "request's history.")

    class SimilarItemsRequest(Retrieval):
        """``POST /similar-items``: the catalogue items nearest to one item."""

        item_id: Id = Field(description="Raw id of a catalogue item (unknown: 404).")

    class ScoreRequest(UserQuery):
        """``POST /score``: the user's score for given items (e.g. to re-rank candidates)."""

        item_ids: Annotated[list[Id], Field(min_length=1, max_length=cfg.max_k)] = Field(
            description=f"Raw catalogue item ids, 1..{cfg.max_k} of them (serve.max_k); an "
            "id not in the catalogue is a 404.")

    class Event(_Strict):
        """One interaction to add to the user's state and to the events log."""

        user_id: Id = Field(description="Raw user id, of the run's key type; a user the "
                            "store does not hold is created by its first event.")
        item_id: Id = Field(description="Raw item id, of the catalogue's key type; an item "
                            "not in the catalogue is logged but left out of the history.")
        timestamp: integer(0, EVENT_TIME_MAX) = Field(
            default=None, description="Integer time (unix seconds, or the data's own "
            f"integer clock), 0..{EVENT_TIME_MAX}; default: the server's unix time.")
        weight: Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)] = Field(
            default=None, description="Finite, >= 0: the interaction's loss weight when the "
            "run's data has data.weight; default 1.")

    Events = Annotated[list[Event], BeforeValidator(_one_or_many),
                       Field(min_length=1, max_length=cfg.max_events)]
    return RequestModels(RecommendRequest, SimilarItemsRequest, ScoreRequest, Events)


DEFAULT_MODELS = request_models(ServeConfig())
RecommendRequest = DEFAULT_MODELS.recommend
SimilarItemsRequest = DEFAULT_MODELS.similar_items
ScoreRequest = DEFAULT_MODELS.score

BOUND_TYPES = ("too_long", "string_too_long", "less_than_equal", "greater_than_equal")
# field -> the serve setting that bounds it, to name it in the 422 message
BOUNDS = {"k": "max_k", "item_ids": "max_k", "history": "max_history",
          "exclude_items": "max_exclude_items", "allow_items": "max_allow_items",
          "features": "max_keys", "filter": "max_keys", "events": "max_events"}
