#!/usr/bin/env bash
# The test command (README and CI): install what is needed, then run the whole suite.
# pytest's "no tests collected" (exit 5) is an error here.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh || exit 1
python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
