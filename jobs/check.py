"""Check that a run directory loads for serving, before rolling it out.

Loads the run as a replica's ``reconfigure`` does (model, index behind its version guard,
catalogue against the index's catalogue hash, user-state store, feature state), answers one
request (an anonymous one, and one for ``--user-id``) and prints what ``GET /version`` would
show; exit 1 with the reason when the run cannot be served, whatever the failure. Run it
before changing ``user_config.run_dir``: running replicas refuse a run that does not load
and keep the old one, and a replica started later falls back to the last run that loaded.

    python -m jobs.check runs/demo
    ray job submit --working-dir . -- python -m jobs.check /shared/runs/demo --user-id 7
"""

from __future__ import annotations

import json
import sys

from jobs.cli import doc_parser
from serve_app.check import check_run_dir


def main(argv: list[str] | None = None) -> int:
    """Print the version JSON (exit 0) or the error (exit 1)."""
    p = doc_parser(__doc__)
    p.add_argument("run_dir", help="Run directory with model/, index/ and prepared/, "
                   "e.g. runs/demo.")
    p.add_argument("--user-id", type=json.loads, default=None,
                   help="Also answer for this known user (read from the run's user-state "
                   "store), as JSON, e.g. --user-id 7 or --user-id '\"u7\"'.")
    args = p.parse_args(argv)
    try:
        info = check_run_dir(args.run_dir, args.user_id)
    except Exception as err:  # noqa: BLE001 - anything a replica's load would meet
        print(f"error: {args.run_dir} cannot be served: {type(err).__name__}: {err}",
              file=sys.stderr)
        return 1
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
