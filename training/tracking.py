"""MLflow logging of parameters and per-epoch metrics (rank 0 only; can be switched off).

The default store is a local file store under ``RUN_DIR/mlruns``; a resumed run keeps
logging into the same MLflow run (its id is kept in ``RUN_DIR/mlflow_run_id``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Config
from pipeline.run_dir import RunDir

_BAD = re.compile(r"[^0-9A-Za-z_\-./ ]")


def metric_key(name: str) -> str:
    """MLflow accepts letters, digits and ``_-./ ``: ``val/HR@10`` -> ``val/HR_at_10``."""
    return _BAD.sub("_", name.replace("@", "_at_"))


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.lr": "0.001"}`` (MLflow params are flat strings)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = str(v)[:500]
    return out


def tracking_uri(cfg: Config, run_dir: Path) -> str:
    """``train.mlflow.tracking_uri``, else the file store ``RUN_DIR/mlruns`` (as a URI)."""
    uri = cfg.train.mlflow.tracking_uri or RunDir(run_dir).mlruns.resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked;
        # it needs no server or database, which is what a default should need.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def create_experiment(cfg: Config, run_dir: Path) -> None:
    """Create the MLflow experiment now, so that trials starting together do not race to."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg, run_dir))
    mlflow.set_experiment(cfg.train.mlflow.experiment)


class Tracker:
    """A thin MLflow run; every method is a no-op when disabled."""

    def __init__(self, cfg: Config, run_dir: Path, enabled: bool = True):
        self._mlflow = None
        if not (enabled and cfg.train.mlflow.enabled):
            return
        import mlflow

        run_dir = Path(run_dir).resolve()
        self._uri = tracking_uri(cfg, run_dir)
        with self._errors("starting the run"):
            mlflow.set_tracking_uri(self._uri)
            mlflow.set_experiment(cfg.train.mlflow.experiment)
            id_file = RunDir(run_dir).mlflow_run_id
            run_id = id_file.read_text().strip() if id_file.exists() else None
            run = mlflow.start_run(run_id=run_id, run_name=run_dir.name)
            if run_id is None:
                id_file.write_text(run.info.run_id)
                params = flatten({k: v for k, v in cfg.to_dict().items() if k != "features"})
                mlflow.log_params(params)
        self._mlflow = mlflow

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """An MLflow or file-system failure as one ``OSError`` line naming the store."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (OSError, MlflowException) as err:
            lines = [line for line in str(err).splitlines() if line.strip()]
            raise OSError(f"MLflow tracking at {self._uri}: {doing} failed: "
                          f"{lines[-1] if lines else type(err).__name__} (disk full or not "
                          "writable? train.mlflow.enabled=false turns tracking off)") from None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Log numeric metrics at an epoch."""
        if self._mlflow is not None:
            with self._errors(f"logging epoch {step}"):
                self._mlflow.log_metrics(
                    {metric_key(k): float(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        """End the MLflow run."""
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None
