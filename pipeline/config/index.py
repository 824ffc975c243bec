"""The ``index`` section: the FAISS index and the embedding batch job."""

from __future__ import annotations

from pydantic import Field

from pipeline.strict import StrictModel


class IndexConfig(StrictModel):
    """The FAISS index over the catalogue and the embedding batch job."""

    factory: str | None = Field(
        default=None, description="FAISS index-factory string (e.g. 'HNSW32', 'IVF1024,Flat') "
        "or 'exact'; null: by catalogue size, Flat below 50,000 items, HNSW32 up to 10^6, IVF "
        "beyond."
    )
    params: dict[str, int] = Field(
        default_factory=dict, description="Search parameters, e.g. {nprobe: 16, efSearch: 64}."
    )
    recall_k: int = Field(default=100, ge=1, description="K of the recall@K check.")
    target_recall: float | None = Field(
        default=0.9, gt=0, le=1, description="The build doubles an ANN index's search "
        "effort (efSearch of HNSW up to 1,024, nprobe of IVF up to an eighth of its lists) "
        "from params until the recall@K check reaches this; null: params as given."
    )
    recall_users: int = Field(default=1000, ge=1, description="Users sampled for recall.")
    batch_size: int = Field(default=4096, ge=1, description="Rows per inference batch.")
    num_actors: int = Field(default=1, ge=1, description="Inference actors.")
    local_max_rows: int = Field(
        default=100_000, ge=0, description="Tables (items, users) of at most this many rows "
        "are embedded in the job's process; larger ones by Ray Data in an actor pool. 0: "
        "always the pool."
    )
    num_cpus_per_actor: float = Field(default=1.0, gt=0, description="CPUs per actor.")
    use_gpu: bool = Field(default=False, description="One GPU per inference actor.")
