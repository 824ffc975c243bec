"""cluster.yaml is a valid Ray cluster-launcher config with the node types the README names,
and it keeps the dashboard (the job API: running code) off the network."""

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


def test_dashboard_listens_on_localhost_only_and_auth_mode_is_explicit():
    raw = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = [c for c in raw["head_start_ray_commands"] if " start " in c]
    workers = [c for c in raw["worker_start_ray_commands"] if " start " in c]
    assert len(head) == 1 and "--head" in head[0]
    # reachable only through the `ray dashboard` SSH tunnel (ssh -L ...:localhost:8265)
    assert "--dashboard-host=127.0.0.1" in head[0].split()
    every_command = [c for key, cmds in raw.items() if key.endswith("_commands")
                     for c in cmds]
    assert not any("0.0.0.0" in c for c in every_command)
    # Ray 2.60 picks token auth from whatever ~/.ray/auth_token exists: say it on every node
    for command in head + workers:
        assert command.startswith("RAY_AUTH_MODE="), command
    assert len({c.split()[0] for c in head + workers}) == 1  # the same mode everywhere
