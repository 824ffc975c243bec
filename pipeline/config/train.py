"""The ``train`` section: scaling, optimisation, early stopping, checkpoints, MLflow."""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from pipeline.strict import StrictModel


class LRSchedule(str, enum.Enum):
    """Learning-rate schedule after the linear warm-up."""

    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


class Precision(str, enum.Enum):
    """Autocast precision; ``auto`` is bf16 on GPU and fp32 on CPU."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


class Placement(str, enum.Enum):
    """How Ray places the training workers (a placement-group strategy)."""

    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_SPREAD = "STRICT_SPREAD"  # every worker on a different node


VALIDATION_METRICS = frozenset({"HR@10", "HR@50", "HR@100", "NDCG@10"})


class MLflowConfig(StrictModel):
    """Where metrics and parameters are logged besides the Ray dashboard."""

    enabled: bool = Field(default=True, description="Log to MLflow at all.")
    tracking_uri: str | None = Field(
        default=None, description="Tracking URI; default: a file store under RUN_DIR/mlruns."
    )
    experiment: str = Field(default="towerline", description="MLflow experiment name.")


class TrainConfig(StrictModel):
    """Ray Train scaling, optimisation, evaluation and checkpointing."""

    num_workers: int = Field(default=2, ge=0, description="Ray Train workers (0: in-process).")
    use_gpu: bool = Field(default=False, description="One GPU per worker; NCCL and bf16.")
    cpus_per_worker: float = Field(
        default=0.5, gt=0, description="CPUs reserved per worker; keep some for Ray Data."
    )
    placement: Placement = Field(default=Placement.PACK, description="Worker placement.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Extra custom resources per worker, e.g. {gpu_node: 1}."
    )
    batch_size: int = Field(default=1024, ge=2, description="Rows per worker per step.")
    epochs: int = Field(default=10, ge=1,
                        description="Maximum epochs (with refit: exactly this many).")
    lr: float = Field(default=1e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    schedule: LRSchedule = Field(default=LRSchedule.COSINE, description="LR schedule.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warm-up steps.")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Max gradient norm.")
    average_epochs: float | None = Field(
        default=None, gt=0,
        description="Evaluate, save and serve an exponential moving average of the weights "
                    "over about this many epochs (per-step decay 1 - 1 / (average_epochs x "
                    "steps per epoch), so it means the same on any data size); over the "
                    "first steps TF's warm-up caps the decay at (1 + n) / (10 + n) at step n, "
                    "an average over about a ninth of the steps so far, until that span "
                    "reaches the one asked; null: the last step's weights.",
    )
    refit: bool = Field(
        default=False,
        description="Train on the training and validation interactions for exactly `epochs` "
                    "epochs, with no validation and no early stopping: the final model of a "
                    "setting chosen on validation with refit off, as EVALUATION.md refits "
                    "its matrix-factorisation rows. The test targets stay unseen. Prepare "
                    "cuts the sequence windows from both splits, so re-run it after a change.",
    )
    precision: Precision = Field(default=Precision.AUTO, description="Autocast precision.")
    seed: int = Field(default=0, description="Seed of weights, shuffling and negatives.")
    early_stopping_metric: str = Field(
        default="HR@50", description="Validation metric (masked) that picks the best epoch."
    )
    patience: int = Field(
        default=3, ge=1, description="Epochs in a row without progress (min_improvement) to stop."
    )
    min_improvement: float = Field(
        default=0.001, ge=0.0,
        description="Smallest rise of the early-stopping metric over its last progress that "
                    "counts as progress; smaller gains still pick the best epoch.",
    )
    threads_per_worker: int | None = Field(
        default=None, ge=1,
        description="Torch threads per Ray Train worker; default: the node's CPUs over the "
                    "workers on it. The plain loop uses torch's default (every core).",
    )
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts allowed.")
    storage_path: str | None = Field(
        default=None, description="Ray Train storage (local path or URI); default RUN_DIR/train."
    )
    num_to_keep: int = Field(default=2, ge=1, description="Checkpoints kept (best included).")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig,
                                description="MLflow logging of params and per-epoch metrics.")

    @model_validator(mode="after")
    def _metric_known(self) -> TrainConfig:
        if self.early_stopping_metric not in VALIDATION_METRICS:
            raise ValueError(f"early_stopping_metric {self.early_stopping_metric!r} is not one "
                             f"of {sorted(VALIDATION_METRICS)}")
        return self
