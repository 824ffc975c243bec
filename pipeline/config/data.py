"""The ``data`` and ``prepare`` sections: where the tables are and how they are split."""

from __future__ import annotations

import enum
import os
from pathlib import Path

from pydantic import Field, model_validator

from pipeline.strict import StrictModel


class DataConfig(StrictModel):
    """Where the three Parquet inputs are and what their key columns are called."""

    root: str | None = Field(
        default=None, description="Base for relative table paths (the one field to override)."
    )
    interactions: str = Field(description="File, folder or glob; local or s3://, gs://, ...")
    extra_interactions: str | None = Field(
        default=None, description="More interactions, read beside `interactions` with the "
        "same columns: e.g. the events log of POST /events (serve.events_dir), so the next "
        "run trains on what was served. A folder that does not exist yet adds nothing.")
    users: str = Field(description="File, folder or glob of the user table.")
    items: str = Field(description="File, folder or glob of the item table (the catalogue).")
    user_id: str = Field(default="user_id", description="User key column (all tables).")
    item_id: str = Field(default="item_id", description="Item key column (all tables).")
    timestamp: str = Field(default="timestamp", description="Interaction time column.")
    weight: str | None = Field(
        default=None, description="Optional numeric interaction column: each row's loss weight "
        "(finite, >= 0; the loss is sum w * loss / sum w)."
    )

    def resolve(self, path: str) -> str:
        """Join a table path with `root` unless it is absolute or a URI."""
        if self.root is None or "://" in path or os.path.isabs(path):
            return path
        if "://" in self.root:
            return self.root.rstrip("/") + "/" + path
        return str(Path(self.root) / path)


class Duplicates(str, enum.Enum):
    """What prepare does with interactions that repeat an earlier (user, item, time) row."""

    ERROR = "error"  # refuse the data, naming the file and row of the first repeat
    DROP = "drop"  # keep the first of each, with a warning that counts the rest
    KEEP = "keep"  # keep them all (repeated events that really happened twice)


class PrepareConfig(StrictModel):
    """How the prepare job splits and writes."""

    min_user_interactions: int = Field(
        default=3, ge=1, description="Users with fewer interactions are left out of the splits "
        "(users.parquet keeps their history and seen items); below 3, some kept users get no "
        "training row (prepare warns)."
    )
    duplicates: Duplicates = Field(
        default=Duplicates.DROP, description="Interactions that repeat an earlier row's user, "
        "item and timestamp exactly (a table read twice, a backup copy in a subfolder): "
        "'drop' keeps the first and warns with the count; 'error' refuses the data; 'keep' "
        "trains on them (a repeated last event makes validation equal test).")
    max_user_interactions: int | None = Field(
        default=None, ge=3, description="Keep only each user's latest N interactions, so that "
        "one user (a bot, a shared account) cannot fill the training windows; None keeps "
        "all. Prepare warns about users holding a large share either way.")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per Ray Data transform task.")
    local_max_rows: int = Field(
        default=1_000_000, ge=0, description="Inputs of at most this many interactions are "
        "read, split and written in the job's own process with pyarrow (Ray Data's fixed "
        "start-up costs more than it saves there); larger ones through Ray Data. 0: always "
        "Ray Data."
    )
    rows_per_file: int = Field(default=1_000_000, ge=1000, description="Output file size.")

    @model_validator(mode="after")
    def _cap_above_floor(self) -> PrepareConfig:
        cap, floor = self.max_user_interactions, self.min_user_interactions
        if cap is not None and cap < floor:
            raise ValueError(f"max_user_interactions {cap} is below min_user_interactions "
                             f"{floor}: every user would be left out")
        return self
