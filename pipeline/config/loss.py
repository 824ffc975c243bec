"""The ``loss`` section: the retrieval loss on the [B, N] score matrix."""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from pipeline.strict import StrictModel


class LossKind(str, enum.Enum):
    """Retrieval loss family."""

    SOFTMAX = "softmax"  # in-batch (+ shared negatives) sampled softmax
    BCE = "bce"  # pointwise: positives vs every negative in the candidate set
    GBCE = "gbce"  # generalised BCE (gSASRec): the positive's term raised to the power beta


class NegativeSampling(str, enum.Enum):
    """Distribution of the extra negatives shared across a batch."""

    UNIFORM = "uniform"
    POPULARITY = "popularity"


class LossConfig(StrictModel):
    """The retrieval loss on the [B, N] score matrix (TFRS-style retrieval task)."""

    kind: LossKind = Field(
        default=LossKind.SOFTMAX, description="softmax (sampled softmax over the candidates), "
        "bce (pointwise) or gbce (gSASRec's generalised BCE, calibrated by gbce_t).")
    logq_correction: bool = Field(
        default=True, description="Subtract log of each candidate's sampling probability."
    )
    mask_accidental_hits: bool = Field(
        default=True, description="A candidate equal to the row's positive is not a negative."
    )
    extra_negatives: int = Field(
        default=0, ge=0, description="Negatives sampled per batch and shared by every row."
    )
    negative_sampling: NegativeSampling = Field(
        default=NegativeSampling.UNIFORM, description="How extra_negatives are drawn: uniformly "
        "over the catalogue or by popularity^popularity_alpha.")
    popularity_alpha: float = Field(
        default=0.75, ge=0.0, le=1.0, description="Popularity sampling p ~ count^alpha."
    )
    hard_negatives: int = Field(
        default=0, ge=0, description="Keep only the N highest-scoring negatives per row (0: all)."
    )
    impressions_column: str | None = Field(
        default=None, description="Interaction list column of shown-not-clicked item ids, "
        "each row's own extra negatives (ids not in the catalogue are dropped)."
    )
    max_impressions: int = Field(
        default=20, ge=1, description="Impressions kept per row (the first ones); the "
        "prepared [L] column is padded with -1."
    )
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="Softmax only.")
    gbce_t: float = Field(
        default=0.75, ge=0.0, le=1.0, description="kind=gbce: calibration t of gSASRec "
        "(Petrov & Macdonald, 2023); beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha) with "
        "alpha the sampled share of the catalogue. 1 is fully calibrated, 0 is plain BCE."
    )
    variational_dropout_weight: float = Field(
        default=1e-4, ge=0.0, description="Weight of the variational dropout penalty."
    )

    @model_validator(mode="after")
    def _combinations(self) -> LossConfig:
        if self.kind is not LossKind.SOFTMAX and self.label_smoothing:
            raise ValueError(f"label_smoothing={self.label_smoothing} applies to kind=softmax, "
                             f"not kind={self.kind.value}")
        if self.kind is not LossKind.SOFTMAX and self.logq_correction:
            raise ValueError("logq_correction=true corrects a sampled softmax; set it false "
                             f"with kind={self.kind.value}")
        return self
