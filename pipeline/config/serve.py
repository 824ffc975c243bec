"""The ``serve`` section: the Ray Serve retrieval deployment."""

from __future__ import annotations

import enum

from pydantic import Field, model_validator

from pipeline.strict import StrictModel


class Ingress(str, enum.Enum):
    """Which server answers ``http://host:port`` (``serve_app.environment`` has the details)."""

    HAPROXY = "haproxy"  # Serve's bundled HAProxy in front of each replica's own server
    DIRECT = "direct"  # replicas on their own ports, for an external load balancer
    PROXY = "proxy"  # Ray Serve's Python proxy


class UserStoreKind(str, enum.Enum):
    """Where a replica reads users from (``serve_app.user_store`` has the details)."""

    EMBEDDED = "embedded"  # LMDB in RUN_DIR/user_state: memory-mapped, shared on a node
    REDIS = "redis"  # a Redis server (serve.redis_url), for replicas on several nodes
    MEMORY = "memory"  # users.parquet in every replica, as prepared; takes no events


class ServeConfig(StrictModel):
    """The Ray Serve retrieval deployment: endpoint, replicas, batching, request bounds."""

    host: str = Field(default="127.0.0.1", description="HTTP host Serve binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    ingress: Ingress = Field(
        default=Ingress.HAPROXY, description="What answers host:port; applied when Ray "
        "starts (run_app, `python -m jobs.environment` for ray start / serve run).")
    num_replicas: int = Field(default=1, ge=1, description="Replicas when not autoscaling.")
    autoscaling: bool = Field(default=False, description="Autoscale between min and max.")
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling lower bound.")
    max_replicas: int = Field(default=2, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(default=8.0, gt=0, description="Autoscaling target.")
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs per replica.")
    stored_user_embeddings: bool = Field(
        default=True, description="Answer a known user sent without features or history "
        "with the embedding jobs.build_index wrote for it (no tower forward; U x D floats "
        "in memory); false runs the tower for every request.")
    user_store: UserStoreKind = Field(
        default=UserStoreKind.EMBEDDED, description="Where users' features, histories and "
        "events live: embedded (LMDB beside the run, shared by the replicas of a node), "
        "redis (serve.redis_url; load it with `python -m jobs.user_store RUN_DIR "
        "--redis-url URL`) or memory (users.parquet in each replica; no /events).")
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="The Redis server of "
        "user_store: redis.")
    store_timeout_s: float = Field(
        default=1.0, gt=0, description="Longest wait for the Redis user store; past it a "
        "request is a 503 with Retry-After (one that sends its own history is served).")
    events_dir: str | None = Field(
        default=None, description="Folder of the events log that POST /events appends to "
        "(Parquet; data.extra_interactions of the next run); default: events/ beside the "
        "run directory.")
    max_events: int = Field(default=1000, ge=1, description="Most events in one POST /events.")
    batching: bool = Field(
        default=True, description="Run the user tower and the index search once for the "
        "requests that arrive together (serve_app.batching); false answers each on its own.")
    max_batch_size: int = Field(default=16, ge=1, description="Most requests per batch.")
    batch_wait_timeout_s: float = Field(
        default=0.0, ge=0, description="How long a batch waits for more requests; 0 batches "
        "what queued while the previous batch ran, adding no wait at low load.")
    max_k: int = Field(default=1000, ge=1, description="Largest k; most item_ids in /score.")
    max_history: int = Field(default=1000, ge=1, description="Longest history accepted.")
    max_exclude_items: int = Field(default=1000, ge=0, description="Most exclude_items.")
    max_allow_items: int = Field(default=10_000, ge=1, description="Most allow_items.")
    max_values: int = Field(
        default=100, ge=1, description="Most values in one list-valued feature or in one "
        "filter attribute.")
    max_keys: int = Field(
        default=64, ge=1, description="Most keys in a request's features and in its filter "
        "(each a run column or attribute); more is a 422 before any key is checked.")
    max_errors: int = Field(
        default=20, ge=1, description="Most entries in the detail list of a 4xx answer; the "
        "last one says how many more were found.")
    max_string_length: int = Field(
        default=1024, ge=1, description="Longest string anywhere in a request (ids, feature "
        "values, filter values), in characters.")
    max_body_bytes: int = Field(
        default=1 << 20, ge=1024, description="Largest request body; more is a 413.")
    body_timeout_s: float = Field(
        default=10.0, gt=0, description="Longest a request body may take to arrive, from its "
        "first read; a slower client gets a 408 and frees its slot (max_ongoing_requests), "
        "so clients that trickle their bodies cannot hold every slot.")

    @model_validator(mode="after")
    def _bounds(self) -> ServeConfig:
        if self.autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above "
                             f"max_replicas={self.max_replicas}")
        return self
