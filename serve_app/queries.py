"""Encoded requests and their answers: what a request becomes before its batch, and after.

``Retriever.encode_*`` turns one validated request into a query (the user's encoded inputs,
its restriction); ``*_encoded`` answers a batch of them with :class:`Answer` values that
render straight to the response JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydantic_core

from serve_app.encode import EncodedUser
from serve_app.schemas import RawId, ScoredItem


@dataclass(frozen=True)
class Restriction:
    """What one request may return: rows left out, and the only rows allowed (or None)."""

    exclude: np.ndarray  # [E] int64 catalogue rows
    allow: np.ndarray | None  # [A] sorted int64 catalogue rows; None: the whole catalogue


@dataclass(frozen=True)
class RecommendQuery:
    """An encoded ``/recommend`` request: the user, k and what it may return."""

    user: EncodedUser
    k: int
    rows: Restriction


@dataclass(frozen=True)
class ScoreQuery:
    """An encoded ``/score`` request: the user and the catalogue rows of its items."""

    user: EncodedUser
    item_ids: list[RawId]
    rows: np.ndarray  # [N] int64 catalogue rows, in request order


@dataclass(frozen=True)
class SimilarQuery:
    """An encoded ``/similar-items`` request."""

    row: int  # catalogue row of the query item
    k: int
    rows: Restriction


@dataclass(frozen=True)
class Answer:
    """One answer: raw item ids and their scores, best first, and the model that gave it.

    ``key`` names the list in the JSON body (``items`` or ``scores``).
    """

    item_ids: list[RawId]
    scores: list[float]
    model_version: str
    key: str = "items"
    state_version: int | None = None  # the user's events since prepare (None: not stored)

    def to_json(self) -> bytes:
        """The response body, rendered without a model.

        pydantic-core's serializer: a quarter of ``json.dumps``'s time on a 10-item answer.
        """
        entries = [{"item_id": i, "score": s}
                   for i, s in zip(self.item_ids, self.scores, strict=True)]
        return pydantic_core.to_json(self._body(entries))

    def to_model(self, cls: type) -> Any:
        """The answer as ``cls`` (a response model of :mod:`serve_app.schemas`)."""
        entries = [ScoredItem(item_id=i, score=s)
                   for i, s in zip(self.item_ids, self.scores, strict=True)]
        return cls(**self._body(entries))

    def _body(self, entries: list) -> dict[str, Any]:
        body = {self.key: entries, "model_version": self.model_version}
        if self.state_version is not None:
            body["state_version"] = self.state_version
        return body
