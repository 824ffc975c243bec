r"""Train: ``RUN_DIR/prepared/`` -> Ray Train DDP -> checkpoints and ``RUN_DIR/model/``.

Inputs: the prepared splits and feature state; the ``model``, ``loss`` and ``train``
sections of the config. Outputs: checkpoints under ``RUN_DIR/train/`` (or
``train.storage_path``), MLflow runs under ``RUN_DIR/mlruns/``, and the best checkpoint
as ``RUN_DIR/model/`` (``model.pt`` state_dict + ``meta.json``). Running again with the
same RUN_DIR resumes from the latest checkpoint.

    python -m jobs.train --config configs/ml100k.yaml --output-dir runs/ml100k
    python -m jobs.train --config configs/ml100k.yaml --output-dir runs/ml100k --no-ray
    ray job submit --working-dir . -- python -m jobs.train \
        --config configs/ml100k.yaml --output-dir /shared/runs/ml100k --set train.num_workers=4
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import job_parser, load_job_config, user_errors
from jobs.ray_setup import ensure_ray
from pipeline.config import Config


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(cfg: Config, run_dir: Path, no_ray: bool = False, device: str = "cpu") -> dict:
    """Train; returns the best epoch, its metric and the per-epoch history."""
    if no_ray or cfg.train.num_workers == 0:
        from training.loop import run_plain

        return run_plain(cfg, run_dir, log=_log, device=device)
    from training.ray_train import fit

    ensure_ray()
    return fit(cfg, run_dir, log=_log)


def main(argv: list[str] | None = None) -> None:
    """Parse flags and run."""
    parser = job_parser(__doc__)
    parser.add_argument("--no-ray", action="store_true",
                        help="Train in this process without Ray (same step and data), "
                        "e.g. --no-ray.")
    parser.add_argument("--device", default="cpu",
                        help="Device for --no-ray (cpu, cuda), e.g. --device cuda.")
    args = parser.parse_args(argv)
    cfg = load_job_config(args)
    with user_errors():
        run(cfg, Path(args.output_dir), no_ray=args.no_ray, device=args.device)


if __name__ == "__main__":
    main()
