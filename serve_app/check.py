"""Check that a run directory loads for serving, before rolling it out.

    python -m serve_app.check RUN_DIR

Loads the :class:`~serve_app.retriever.Retriever` exactly as a replica's ``reconfigure``
does (model, index behind its version guard, catalogue against the index's catalogue
hash, users, feature state), answers one anonymous request and prints what
``GET /version`` would show, plus the run directory; exit code 1 with the reason when the
run does not load, whatever the failure (a truncated index, a missing column or key, a
foreign feature state). Run it before changing ``user_config.run_dir``: running replicas
refuse a run that does not load and keep the old one (``rollout.status = "refused"`` in
``GET /version``), but a replica started later (a crash, a scale-up) loads the configured
run and fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from serve_app.retriever import Retriever
from serve_app.schemas import RecommendRequest


def check_run_dir(run_dir: str) -> dict[str, Any]:
    """Load ``run_dir`` and answer one cold-start request; raises what a replica would."""
    retriever = Retriever(run_dir)
    retriever.recommend([RecommendRequest(history=[], k=1)])
    return {"run_dir": str(retriever.run_dir), **retriever.info().model_dump(mode="json")}


def main(argv: list[str] | None = None) -> int:
    """Print the version JSON (exit 0) or the error (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="Run directory with model/, index/ and prepared/.")
    args = parser.parse_args(argv)
    try:
        info = check_run_dir(args.run_dir)
    except Exception as err:  # noqa: BLE001 - anything a replica's load would meet
        print(f"error: {args.run_dir} cannot be served: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
