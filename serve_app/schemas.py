"""Request and response bodies of the retrieval endpoint, and the errors it answers with.

Raw ids (users and items) are JSON integers or strings, as in the source tables; a
request's ``features`` are raw values keyed by the user feature's *source column* (the
same names as the users table), encoded on the server by ``pipeline.transforms``.

Bounds that come from the deployment's ``ServeConfig`` (``max_k``, ``max_history``) are
checked by :func:`limit_errors`, which reports them in FastAPI's 422 format so that every
4xx body has the same shape: ``{"detail": [{"loc": [...], "msg": ..., "input": ...}]}``.
"""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

RawId = Union[StrictInt, StrictStr]
Scalar = Union[StrictInt, float, StrictStr, None]
FeatureValue = Union[Scalar, list[Scalar]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserQuery(_Strict):
    """Who the user is: a known id, raw feature values, a history, or any mix of them."""

    user_id: RawId | None = Field(
        default=None, description="Raw user id. Known: its stored features, history and seen "
        "items are used; unknown: the out-of-vocabulary row (cold start).")
    features: dict[str, FeatureValue] | None = Field(
        default=None, description="Raw user feature values keyed by source column (e.g. "
        "{'age': 31, 'country': 'DE'}); they override the stored values. Unseen categories "
        "take the out-of-vocabulary row, null the padding / fill value.")
    history: list[RawId] | None = Field(
        default=None, description="Raw item ids the user interacted with, oldest first; "
        "replaces the stored history. Unknown ids take the out-of-vocabulary row.")

    @model_validator(mode="after")
    def _someone(self) -> UserQuery:
        if self.user_id is None and self.features is None and self.history is None:
            raise ValueError("at least one of user_id, features or history is required")
        return self


class RecommendRequest(UserQuery):
    """``POST /recommend``: the top ``k`` catalogue items for a user."""

    k: int = Field(default=10, ge=1, description="Items to return, 1..serve.max_k.")
    exclude_seen: bool = Field(
        default=True, description="Leave out the user's stored seen items and the request's "
        "history.")
    exclude_items: list[RawId] = Field(
        default_factory=list, description="Raw item ids never to return (unknown ids ignored).")


class SimilarItemsRequest(_Strict):
    """``POST /similar-items``: the catalogue items nearest to one item."""

    item_id: RawId = Field(description="Raw id of a catalogue item.")
    k: int = Field(default=10, ge=1, description="Items to return, 1..serve.max_k.")


class ScoreRequest(UserQuery):
    """``POST /score``: the user's score for given items (e.g. to re-rank candidates)."""

    item_ids: list[RawId] = Field(
        min_length=1, description="Raw catalogue item ids, at most serve.max_k of them.")


class ScoredItem(_Strict):
    """One item and its score (inner product; cosine when the model normalises)."""

    item_id: RawId = Field(description="Raw item id.")
    score: float = Field(description="Similarity between the query and the item.")


class RecommendResponse(_Strict):
    """The best items first."""

    items: list[ScoredItem] = Field(description="At most k items, best first.")
    model_version: str = Field(description="Version of the model that answered.")


class SimilarItemsResponse(_Strict):
    """The nearest items first (the query item itself left out)."""

    items: list[ScoredItem] = Field(description="At most k items, nearest first.")
    model_version: str = Field(description="Version of the model that answered.")


class ScoreResponse(_Strict):
    """One score per requested item, in request order."""

    scores: list[ScoredItem] = Field(description="Scores in the order of item_ids.")
    model_version: str = Field(description="Version of the model that answered.")


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


class VersionResponse(_Strict):
    """``GET /version``: what is being served."""

    model_version: str = Field(description="Content hash of the model weights.")
    feature_state_hash: str = Field(description="Hash of prepared/feature_state.json.")
    index: IndexSummary = Field(description="The index the model queries.")
    run_dir: str = Field(description="The run directory loaded.")
    rollout_error: str | None = Field(
        default=None, description="Why the last rollout was refused (the old run serves)."
    )


class ReloadConfig(_Strict):
    """The deployment's ``user_config``: what ``reconfigure`` accepts."""

    run_dir: str = Field(description="Run directory to serve (model/, index/, prepared/).")
    max_batch_size: int | None = Field(default=None, ge=1, description="@serve.batch size.")
    batch_wait_timeout_s: float | None = Field(
        default=None, ge=0, description="@serve.batch wait in seconds.")


class RequestError(ValueError):
    """A request the retriever cannot answer; names the field and the value.

    Args:
        loc: path of the field in the body, e.g. ``("features", "age")``.
        value: the offending value.
        message: what is wrong and what would be accepted.
    """

    status_code = 422
    error_type = "value_error"

    def __init__(self, loc: tuple[str | int, ...], value: Any, message: str):
        super().__init__(message)
        self.loc, self.value, self.message = loc, value, message

    def detail(self) -> dict[str, Any]:
        """One entry of the response's ``detail`` list (FastAPI's error shape)."""
        return {"type": self.error_type, "loc": ["body", *self.loc], "msg": self.message,
                "input": self.value}


class UnknownItemError(RequestError):
    """An item id that is not in the catalogue (HTTP 404)."""

    status_code = 404
    error_type = "unknown_item"


def limit_errors(request: BaseModel, max_k: int, max_history: int) -> list[dict[str, Any]]:
    """The request's violations of the deployment's bounds, in FastAPI's 422 error format.

    Args:
        request: a parsed request body.
        max_k: serve.max_k, the most results (or scored items) one request may ask for.
        max_history: serve.max_history, the longest history accepted.

    Returns:
        One error dict per violated bound (empty when the request is within bounds).
    """
    errors = []
    k = getattr(request, "k", None)
    if k is not None and k > max_k:
        errors.append(_too_big("k", k, max_k, "serve.max_k"))
    item_ids = getattr(request, "item_ids", None)
    if item_ids is not None and len(item_ids) > max_k:
        errors.append(_too_big("item_ids", item_ids, max_k, "serve.max_k", "items"))
    history = getattr(request, "history", None)
    if history is not None and len(history) > max_history:
        errors.append(_too_big("history", history, max_history, "serve.max_history", "items"))
    return errors


def _too_big(field: str, value: Any, limit: int, setting: str, unit: str = "") -> dict:
    """A FastAPI-style error for a value (or a list's length) above a configured limit."""
    if unit:
        msg = f"{field} has {len(value)} {unit}; at most {limit} ({setting}) are accepted"
        shown: Any = f"<list of {len(value)}>"
    else:
        msg = f"{field}={value} is above {limit} ({setting}); use 1..{limit}"
        shown = value
    return {"type": "less_than_equal", "loc": ("body", field), "msg": msg, "input": shown,
            "ctx": {"le": limit}}
