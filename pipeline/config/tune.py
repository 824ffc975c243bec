"""The ``tune`` section: a search space over any config field, ASHA, and how trials run.

Read by ``python -m jobs.tune`` only; every other job ignores it, so a tuned config (with
its ``tune`` section) is still a config the pipeline takes. Example::

    tune:
      num_samples: 12
      space:
        train.lr: {loguniform: [1.0e-3, 1.0e-2]}
        model.temperature: {choice: [0.05, 0.1]}
        model.user.mlp.dropout: {uniform: [0.0, 0.3]}
        model.user.mlp.hidden: {choice: [[128], [256]]}
        model.output_dim: {choice: [32, 64]}
"""

from __future__ import annotations

import builtins
import enum
from typing import Any

from pydantic import Field, model_validator

from pipeline.config.base import is_prepare_key
from pipeline.config.train import VALIDATION_METRICS
from pipeline.strict import StrictModel

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "int")


class TrialKind(str, enum.Enum):
    """How one trial trains."""

    PLAIN = "plain"  # the plain loop in one Tune actor (training.loop.epochs)
    RAY_TRAIN = "ray_train"  # a Ray Train run (train.num_workers DDP workers) per trial


class Distribution(StrictModel):
    """Values one searched field takes.

    Exactly one of ``choice``, ``uniform``, ``loguniform``, ``int`` (both bounds included).
    """

    choice: list[Any] | None = Field(default=None, description="Values drawn uniformly.")
    uniform: tuple[float, float] | None = Field(default=None, description="[low, high].")
    loguniform: tuple[float, float] | None = Field(
        default=None, description="[low, high], both > 0, drawn uniformly in log space."
    )
    int: tuple[builtins.int, builtins.int] | None = Field(
        default=None, description="[low, high] integers, both included."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        given = [k for k in DISTRIBUTIONS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(DISTRIBUTIONS)}, got {given or 'none'}")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice needs at least one value")
            return self
        low, high = getattr(self, kind)
        if not low < high:
            raise ValueError(f"{kind} [{low}, {high}]: low must be below high")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform [{low}, {high}]: both bounds must be > 0")
        return self

    @property
    def kind(self) -> str:
        """Which of :data:`DISTRIBUTIONS` this is."""
        return next(k for k in DISTRIBUTIONS if getattr(self, k) is not None)

    def candidates(self) -> list[Any]:
        """Values that must all make a valid config: every choice, or both bounds."""
        return list(self.choice) if self.kind == "choice" else list(getattr(self, self.kind))


class AshaConfig(StrictModel):
    """ASHA: trials behind the leaders at a rung stop early (``ray.tune.schedulers``)."""

    grace_period: int = Field(default=2, ge=1, description="Epochs every trial gets.")
    reduction_factor: float = Field(
        default=3.0, ge=2.0, description="Only 1/reduction_factor of trials pass each rung."
    )


class TuneConfig(StrictModel):
    """Search space, scheduler and trial resources for ``python -m jobs.tune``."""

    space: dict[str, Distribution] = Field(
        default_factory=dict,
        description="Dotted config path (as for --set, list entries by index) -> values.",
    )
    num_samples: int = Field(default=12, ge=1, description="Trials drawn from the space.")
    metric: str | None = Field(
        default=None,
        description="Validation metric (masked) to maximise; default train.early_stopping_metric.",
    )
    trainer: TrialKind = Field(default=TrialKind.PLAIN, description="plain or ray_train trials.")
    cpus_per_trial: float = Field(
        default=1.0, gt=0,
        description="CPUs (and torch threads, at least 1) of a plain trial; a ray_train "
                    "trial takes train.num_workers x train.cpus_per_worker.",
    )
    max_concurrent: int | None = Field(
        default=None, ge=1,
        description="Trials at once; default: as many as the cluster's CPUs hold.",
    )
    seed: int = Field(default=0, description="Seed of the random search.")
    asha: AshaConfig = Field(default_factory=AshaConfig,
                           description="The ASHA scheduler that stops trailing trials.")

    @model_validator(mode="after")
    def _paths(self) -> TuneConfig:
        for path in self.space:
            if not path or path.split(".")[0] == "tune":
                raise ValueError(f"tune.space key {path!r}: name a field outside the tune "
                                 "section, e.g. train.lr")
            if is_prepare_key(path):
                raise ValueError(f"tune.space key {path!r}: fixed when the run is prepared "
                                 "(vocabularies, widths, windows), so trials cannot vary it; "
                                 "search the model, loss, sequence and train sections")
        if self.metric is not None and self.metric not in VALIDATION_METRICS:
            raise ValueError(f"tune.metric {self.metric!r} is not one of "
                             f"{sorted(VALIDATION_METRICS)}")
        return self
