#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev extra.
# Installs the local CPU wheel torch==2.13.0 first, so that no CUDA build is downloaded.
# Source it: `. scripts/setup_env.sh` leaves the environment activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
if [ ! -x "$root/.venv/bin/python" ]; then
    echo "[setup] creating $root/.venv with $($py --version)" >&2
    "$py" -m venv "$root/.venv"
fi
# shellcheck disable=SC1091
. "$root/.venv/bin/activate"
stamp="$root/.venv/.towerline-installed"
# Re-install when pyproject.toml changes or a top-level package appears (the editable
# install maps the packages that existed when it ran).
want="$( (cat "$root/pyproject.toml"; cd "$root" && ls -- */__init__.py) | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "[setup] installing torch==2.13.0 (CPU) and the project (about 2 minutes)" >&2
    python -m pip install -q --upgrade pip >/dev/null
    python -m pip install -q "torch==2.13.0"
    python -m pip install -q -e "$root[dev]"
    echo "$want" > "$stamp"
fi
# The Redis tests need a real server (serve.user_store: redis): Debian's redis-server.
if ! command -v redis-server >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "[setup] installing redis-server (Debian package)" >&2
        apt-get install -y -q redis-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q redis-server >/dev/null; }
    else
        echo "[setup] warning: redis-server is missing; install it (e.g. apt-get install" \
             "redis-server) or the Redis tests fail under CI" >&2
    fi
fi
set +eu
