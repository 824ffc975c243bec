"""The flags every job shares: ``--config FILE --output-dir RUN_DIR [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import Config, load_config


def job_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the common job flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="Experiment YAML file.")
    parser.add_argument("--output-dir", required=True, help="Run directory (RUN_DIR).")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override a config field, e.g. --set data.root=/data (repeatable).",
    )
    return parser


def parse_job_args(description: str, argv: list[str] | None = None) -> tuple[Config, Path]:
    """Parse flags and load the config; a config error exits with its message, code 2."""
    args = job_parser(description).parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    return cfg, Path(args.output_dir)
