"""The flags every job shares: ``--config FILE --output-dir RUN_DIR [--set key=value ...]``.

One help path: ``python -m jobs.NAME --help`` lists every flag with an example, and shows
the job's module docstring after them (inputs -> outputs, the local and the
``ray job submit`` command lines).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import Config, load_config


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose help is a job's docstring: its first line, then the rest after the flags."""
    first, _, rest = doc.strip().partition("\n")
    return argparse.ArgumentParser(description=first, epilog=rest.strip() or None,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def job_parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the common job flags; ``doc`` is the job's module docstring."""
    parser = doc_parser(doc)
    parser.add_argument("--config", required=True,
                        help="Experiment YAML file, e.g. --config configs/demo.yaml.")
    parser.add_argument("--output-dir", required=True,
                        help="Run directory (RUN_DIR; created when missing), e.g. "
                        "--output-dir runs/demo.")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="Override a config field (repeatable; YAML values, list entries by index), "
        "e.g. --set data.root=/data --set features.user.0.min_count=5.",
    )
    return parser


@contextmanager
def user_errors(code: int = 1) -> Iterator[None]:
    """Turn an error meant for people (bad value, missing file) into ``error: ...``, exit code."""
    try:
        yield
    except (ValueError, OSError) as err:  # OSError: a full disk, a read-only folder, ...
        print(f"error: {one_line(err)}", file=sys.stderr)
        raise SystemExit(code) from None


def one_line(err: BaseException) -> str:
    """An error as one line: its message's lines joined, the path kept (``[Errno 28] ...``)."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def load_job_config(args: argparse.Namespace) -> Config:
    """Load ``--config`` with ``--set`` overrides; a config error exits with code 2."""
    with user_errors(code=2):
        return load_config(args.config, args.overrides)


def parse_job_args(doc: str, argv: list[str] | None = None) -> tuple[Config, Path]:
    """Parse the common flags and load the config (exit code 2 on a config or flag error)."""
    args = job_parser(doc).parse_args(argv)
    out = Path(args.output_dir)
    with user_errors(code=2):
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output-dir {args.output_dir}: is a file; accepted: a run "
                             "directory (a folder, created when missing)")
    return load_job_config(args), out
