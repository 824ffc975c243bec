"""Write a run's ``serve deploy`` config and print its endpoint URL.

Fills ``configs/serve.yaml`` (or ``--template``) with the run directory and the host and
port of the run's serve config, so that ``serve deploy`` serves the run where its config
says; the URL printed is where the endpoint answers.

    python -m jobs.deploy_config runs/demo --out runs/demo/serve.yaml
    ray job submit --working-dir . -- python -m jobs.deploy_config /shared/runs/demo
"""

from __future__ import annotations

import sys

from jobs.cli import doc_parser
from serve_app.deploy_config import TEMPLATE, write_deploy_config


def main(argv: list[str] | None = None) -> int:
    """Write the YAML, print the endpoint URL (exit 0), or the error (exit 1)."""
    p = doc_parser(__doc__)
    p.add_argument("run_dir", help="Run directory with model/, index/ and prepared/, "
                   "e.g. runs/demo.")
    p.add_argument("--out", help="Where to write the YAML (default RUN_DIR/serve.yaml), "
                   "e.g. --out /tmp/serve.yaml.")
    p.add_argument("--template", default=str(TEMPLATE),
                   help="The deploy YAML to fill, e.g. --template configs/serve.yaml.")
    args = p.parse_args(argv)
    try:
        out, url = write_deploy_config(args.run_dir, args.out, args.template)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: no deploy config for {args.run_dir}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}", file=sys.stderr)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
