"""The strict base model of every config section and feature-kind config (a leaf module).

Nothing in ``pipeline`` sits below it, so ``pipeline.features`` and ``pipeline.config`` can
both build on it without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)
