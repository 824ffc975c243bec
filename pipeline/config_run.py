"""The ``train``, ``index`` and ``serve`` sections of the experiment config."""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from pipeline.config_model import StrictModel


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
    epochs: int = Field(default=10, ge=1, description="Maximum epochs.")
    lr: float = Field(default=1e-3, gt=0, description="AdamW peak learning rate.")
    weight_decay: float = Field(default=1e-4, ge=0, description="AdamW weight decay.")
    schedule: LRSchedule = Field(default=LRSchedule.COSINE, description="LR schedule.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warm-up steps.")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Max gradient norm.")
    precision: Precision = Field(default=Precision.AUTO, description="Autocast precision.")
    seed: int = Field(default=0, description="Seed of weights, shuffling and negatives.")
    early_stopping_metric: str = Field(
        default="HR@50", description="Validation metric (masked) that picks the best epoch."
    )
    patience: int = Field(default=3, ge=1, description="Epochs without improvement to stop.")
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts allowed.")
    storage_path: str | None = Field(
        default=None, description="Ray Train storage (local path or URI); default RUN_DIR/train."
    )
    num_to_keep: int = Field(default=2, ge=1, description="Checkpoints kept (best included).")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)

    @model_validator(mode="after")
    def _metric_known(self) -> TrainConfig:
        known = {"HR@10", "HR@50", "HR@100", "NDCG@10"}
        if self.early_stopping_metric not in known:
            raise ValueError(f"early_stopping_metric {self.early_stopping_metric!r} is not one "
                             f"of {sorted(known)}")
        return self


class IndexConfig(StrictModel):
    """The FAISS index over the catalogue and the embedding batch job."""

    factory: str | None = Field(
        default=None, description="FAISS index-factory string or 'exact'; default by size."
    )
    params: dict[str, int] = Field(
        default_factory=dict, description="Search parameters, e.g. {nprobe: 16, efSearch: 64}."
    )
    recall_k: int = Field(default=100, ge=1, description="K of the recall@K check.")
    recall_users: int = Field(default=1000, ge=1, description="Users sampled for recall.")
    batch_size: int = Field(default=4096, ge=1, description="Rows per inference batch.")
    num_actors: int = Field(default=1, ge=1, description="Inference actors.")
    num_cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs per actor.")
    use_gpu: bool = Field(default=False, description="One GPU per inference actor.")


class ServeConfig(StrictModel):
    """The Ray Serve retrieval deployment."""

    host: str = Field(default="127.0.0.1", description="HTTP host Serve binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    num_replicas: int = Field(default=1, ge=1, description="Replicas when not autoscaling.")
    autoscaling: bool = Field(default=False, description="Autoscale between min and max.")
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(default=2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(default=8.0, gt=0, description="Autoscaling target.")
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs per replica.")
    max_batch_size: int = Field(default=16, ge=1, description="@serve.batch size.")
    batch_wait_timeout_s: float = Field(default=0.002, ge=0, description="@serve.batch wait.")
    max_k: int = Field(default=1000, ge=1, description="Largest k a request may ask for.")
    max_history: int = Field(default=1000, ge=1, description="Longest history accepted.")

    @model_validator(mode="after")
    def _bounds(self) -> ServeConfig:
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above "
                             f"max_replicas={self.max_replicas}")
        return self
