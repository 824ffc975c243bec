#!/usr/bin/env bash
# The main command on a fresh machine: install, generate the demo data, run the pipeline
# on a local Ray. Today the pipeline is `prepare`; later steps are appended as they land.
#   bash scripts/demo.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup_env.sh
run_dir="${1:-runs/demo}"
if [ ! -d data/demo/interactions ]; then
    python -m jobs.make_demo_data --out data/demo --users 5000 --items 2000 --interactions 300000
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
python -m jobs.prepare --config configs/demo.yaml --output-dir "$run_dir"
echo
echo "prepared data: $run_dir/prepared (manifest.json, feature_state.json, train/ validation/ test/)"
