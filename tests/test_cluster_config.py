"""cluster.yaml is a valid Ray cluster-launcher config with the node types the README names,
keeps the dashboard (the job API: running code) off the network and turns token auth on
for every node; docs/security.md says what listens where and how auth is set."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT


def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on an unknown or mistyped key
    types = raw["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["gpu_worker"]["resources"]["GPU"] == 1
    assert (types["gpu_worker"]["min_workers"], types["gpu_worker"]["max_workers"]) == (0, 4)
    assert any("pip install -q -e" in c for c in raw["setup_commands"])


def test_dashboard_listens_on_localhost_only_and_token_auth_is_on_everywhere():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = [c for c in raw["head_start_ray_commands"] if " start " in c]
    workers = [c for c in raw["worker_start_ray_commands"] if " start " in c]
    assert len(head) == 1 and "--head" in head[0]
    # reachable only through the `ray dashboard` SSH tunnel (ssh -L ...:localhost:8265)
    assert "--dashboard-host=127.0.0.1" in head[0].split()
    every_command = [c for key, cmds in raw.items() if key.endswith("_commands")
                     for c in cmds]
    assert not any("0.0.0.0" in c for c in every_command)
    # the GCS, raylets and dashboard agents listen on the nodes' addresses (the agent's job
    # API runs commands): every node demands the one token, shipped to each by file_mounts
    for command in head + workers:
        assert command.startswith("RAY_AUTH_MODE=token "), command
    assert raw["file_mounts"]["/home/ubuntu/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token ray job submit" in (ROOT / "cluster.yaml").read_text()


def test_security_page_says_what_listens_where_and_how_auth_is_set():
    page = (ROOT / "docs" / "security.md").read_text()
    for needed in ("scripts/demo.sh", "cluster.yaml", "RAY_AUTH_MODE=token",
                   "ray get-auth-token --generate", "--node-ip-address=127.0.0.1",
                   "--dashboard-host=127.0.0.1", "52365", "6379", "8404", "9101",
                   "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "tests/test_ray_head.py"):
        assert needed in page, needed
