"""Multi-node training: two Ray nodes on this machine, one training worker on each.

Runs in a subprocess because a ``ray.cluster_utils.Cluster`` needs its own driver (the test
session's Ray is already initialised in this process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = r"""
import json, sys
from pathlib import Path
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from tests.conftest import demo_config
from training.ray_train import fit

run_dir, data, storage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
node = {"num_cpus": 1, "object_store_memory": 200 << 20}
head = {**node, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": int(sys.argv[4])}  # the state API below asks the dashboard
cluster = Cluster(initialize_head=True, head_node_args=head)
cluster.add_node(**node)
ray.init(address=cluster.address, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
try:
    cfg = demo_config(data, "train.num_workers=2", "train.cpus_per_worker=0.5",
                      "train.placement=STRICT_SPREAD", f"train.storage_path={storage}",
                      "train.epochs=1")
    out = fit(cfg, run_dir, log=lambda m: None)
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                          limit=100, raise_on_missing_output=False)
    nodes = sorted({a.node_id for a in workers})
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print(json.dumps({"worker_nodes": nodes, "cluster_nodes": sorted(alive),
                      "epochs": [h["epoch"] for h in out["history"]], "path": out["path"]}))
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_train_with_one_worker_each(demo_prepared, demo_data, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(demo_prepared / "prepared", run_dir / "prepared")
    storage = tmp_path / "shared_storage"  # reached by both nodes
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT),
               RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S="120")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), str(demo_data),
                           str(storage), str(free_port())], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["cluster_nodes"]) == 2
    assert sorted(out["worker_nodes"]) == out["cluster_nodes"]  # one worker on each node
    assert out["epochs"] == [1]
    assert out["path"].startswith(str(storage))
    assert list((storage / "train").glob("checkpoint_*"))
    assert (run_dir / "model" / "model.pt").exists()
