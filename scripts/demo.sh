#!/usr/bin/env bash
# The main command on a fresh machine: install, start a local Ray head (dashboard on
# 127.0.0.1), submit the whole pipeline with `ray job submit`, deploy the Serve endpoint
# with `serve deploy`, send a sample request and print the answer.
#
#   bash scripts/demo.sh                          # generated demo data
#   bash scripts/demo.sh --movielens ~/ml-100k    # MovieLens files you downloaded
#
# Stop everything afterwards with:  serve shutdown -y && ray stop
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
. scripts/setup_env.sh
set -euo pipefail

movielens=""
if [ "${1:-}" = "--movielens" ]; then
    movielens="$(cd "${2:?--movielens needs the folder of the downloaded files}" && pwd)"
fi
# Token auth (docs/security.md): the head's GCS, raylet and dashboard agent listen on this
# machine's network address, and the agent's job API runs any command it is sent; with a
# token only holders of ~/.ray/auth_token (this user) get in. Jobs, `serve deploy` and the
# dashboard API use the same token; the Serve endpoint itself stays on 127.0.0.1.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] \
        && [ ! -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    ray get-auth-token --generate >/dev/null
fi
dashboard="http://127.0.0.1:8265"

# 1. Data (outside the uploaded working dir: .rayignore leaves data/ and runs/ out).
if [ -n "$movielens" ]; then
    config=configs/ml100k.yaml data="$root/data/ml100k" run="$root/runs/ml100k" budget=()
    [ -d "$data/interactions" ] || python -m jobs.convert_movielens --src "$movielens" --out "$data"
else
    # The demo's time budget (under 5 minutes, install included): this data size and at
    # most 3 epochs of the sequence mode (configs/demo.yaml trains up to 60).
    config=configs/demo.yaml data="$root/data/demo" run="$root/runs/demo"
    budget=(--set train.epochs=3)
    [ -d "$data/interactions" ] || python -m jobs.make_demo_data --out "$data" \
        --users 5000 --items 2000 --interactions 150000
fi

# 2. A local Ray head (token auth, addresses on 127.0.0.1; see above), started from this
#    venv so jobs run with this project installed, with the project's Ray defaults (jobs
#    inherit them) and the endpoint's ingress (serve.ingress of the config; default: Serve's
#    bundled HAProxy in front of each replica), which Serve reads from the head's
#    environment: python -m jobs.environment prints them (serve_app/environment.py).
if ! ray status --address 127.0.0.1:6379 >/dev/null 2>&1; then
    eval "$(python -m jobs.environment --config "$config" --one-machine)"
    ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --num-cpus="$(nproc)" --disable-usage-stats
else
    echo "Ray is already running: Serve keeps the ingress it started with" \
         "(python -m jobs.environment shows what to export before ray start)" >&2
fi

# 3. The pipeline as a Ray job: prepare -> train -> build_index -> evaluate.
ray job submit --address "$dashboard" --working-dir . -- \
    python -m jobs.pipeline --config "$config" --output-dir "$run" --set "data.root=$data" \
    "${budget[@]}"

# 4. The endpoint: configs/serve.yaml with this run directory and the host / port of the
#    run's serve config (printed as the endpoint URL), deployed with serve deploy.
endpoint=$(python -m jobs.deploy_config "$run" --out "$run/serve.yaml")
serve deploy --address "$dashboard" "$run/serve.yaml"
for _ in $(seq 1 60); do
    curl -sf "$endpoint/healthz" >/dev/null && break
    sleep 2
done

# 5. A sample request for the first known user.
user=$(python -c "import pyarrow.parquet as pq, json; \
print(json.dumps(pq.read_table('$run/prepared/users.parquet').column(0)[0].as_py()))")
echo
echo "POST /recommend {\"user_id\": $user, \"k\": 5}"
curl -s -X POST "$endpoint/recommend" -H 'content-type: application/json' \
    -d "{\"user_id\": $user, \"k\": 5}"
echo
echo
echo "Ray dashboard:  $dashboard   (jobs, Train runs, Serve; token: ray get-auth-token)"
echo "API docs:       $endpoint/docs"
echo "Metrics:        $run/metrics.json"
echo "Stop:           serve shutdown -y --address $dashboard && ray stop"
