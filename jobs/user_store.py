r"""Load a run's user-state store into Redis, for replicas on several nodes.

``jobs.build_index`` writes every run's embedded store (``RUN_DIR/user_state/``, LMDB).
Replicas with ``serve.user_store: redis`` read a copy of it from a Redis server instead;
this job copies it there, under the store's own key prefix (``towerline:STORE_ID:``), so a
new run's records sit beside the serving run's until the rollout swaps them. Events posted
since the build are not copied: each replica replays them from the events log after its
swap (``serve_app.user_store``).

    python -m jobs.user_store runs/demo --redis-url redis://10.0.0.5:6379/0
    ray job submit --working-dir . -- python -m jobs.user_store /shared/runs/demo \
        --redis-url redis://10.0.0.5:6379/0
"""

from __future__ import annotations

import sys
from pathlib import Path

from jobs.cli import doc_parser, user_errors
from pipeline.run_dir import RunDir
from serve_app.store_build import load_redis
from serve_app.user_store import StoreUnavailable


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> str:
    """Parse flags and load the store; returns the key prefix."""
    p = doc_parser(__doc__)
    p.add_argument("run_dir", type=Path, help="A run directory with user_state/ (built by "
                   "jobs.build_index), e.g. runs/demo.")
    p.add_argument("--redis-url", required=True,
                   help="The Redis server (the run's serve.redis_url), e.g. "
                   "redis://127.0.0.1:6379/0.")
    args = p.parse_args(argv)
    with user_errors():
        try:
            prefix = load_redis(RunDir(args.run_dir), args.redis_url, log=_log)
        except StoreUnavailable as err:
            raise OSError(str(err)) from None
    print(prefix)
    return prefix


if __name__ == "__main__":
    main()
