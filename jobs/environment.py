"""Print the environment a Ray head needs before ``ray start``: ``export`` lines for a shell.

Ray's defaults for every job and worker (a value already exported wins), then the Serve
ingress of MODE, or of the config's ``serve.ingress`` (default haproxy); Serve reads them
when Ray starts. Their one home is ``serve_app/environment.py``. On a cluster, each node's
``ray start`` needs them (``cluster.yaml``).

    eval "$(python -m jobs.environment --config configs/demo.yaml --one-machine)"
    ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1
"""

from __future__ import annotations

import sys

from jobs.cli import doc_parser
from pipeline.config.serve import Ingress
from serve_app.environment import ONE_MACHINE, RAY_DEFAULTS, ingress_env


def main(argv: list[str] | None = None) -> int:
    """Print ``export NAME=VALUE`` lines (``eval "$(python -m jobs.environment)"``)."""
    p = doc_parser(__doc__)
    p.add_argument("mode", nargs="?", choices=[m.value for m in Ingress],
                   help="The ingress (default: the config's serve.ingress, else haproxy), "
                   "e.g. proxy.")
    p.add_argument("--config", help="An experiment config: use its serve.ingress, e.g. "
                   "--config configs/demo.yaml.")
    p.add_argument("--one-machine", action="store_true",
                   help="A head with no other node: Ray Train's spot-preemption watcher off, "
                   "e.g. --one-machine (scripts/demo.sh).")
    args = p.parse_args(argv)
    mode = args.mode or Ingress.HAPROXY.value
    if args.mode is None and args.config:
        from pipeline.config import load_config

        mode = load_config(args.config).serve.ingress.value
    defaults = {**RAY_DEFAULTS, **(ONE_MACHINE if args.one_machine else {})}
    for name, value in defaults.items():  # a value the user exported wins
        print(f'export {name}="${{{name}:-{value}}}"')
    for name, value in ingress_env(mode).items():
        print(f"export {name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
