"""The ``serve`` section: the Ray Serve retrieval deployment."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipeline.config.base import StrictModel


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
