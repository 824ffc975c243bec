"""Check that a run directory loads for serving, before rolling it out.

    python -m serve_app.check RUN_DIR

Loads the :class:`~serve_app.retriever.Retriever` exactly as a replica's ``reconfigure``
does (model, index behind its version guard, catalogue, users), answers one anonymous
request and prints what ``GET /version`` would show; exit code 1 with the reason when the
run does not load. Run it before changing ``user_config.run_dir``: running replicas refuse
a run that does not load and keep the old one (``rollout_error`` in ``GET /version``), but
a replica started later (a crash, a scale-up) loads the configured run and fails.
"""

from __future__ import annotations

import argparse
import sys

from serve_app.retriever import Retriever
from serve_app.schemas import RecommendRequest, VersionResponse


def check_run_dir(run_dir: str) -> VersionResponse:
    """Load ``run_dir`` and answer one cold-start request; raises what a replica would."""
    retriever = Retriever(run_dir)
    retriever.recommend([RecommendRequest(history=[], k=1)])
    return retriever.info()


def main(argv: list[str] | None = None) -> int:
    """Print the version JSON (exit 0) or the error (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="Run directory with model/, index/ and prepared/.")
    args = parser.parse_args(argv)
    try:
        info = check_run_dir(args.run_dir)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"error: {args.run_dir} cannot be served: {err}", file=sys.stderr)
        return 1
    print(info.model_dump_json(indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
