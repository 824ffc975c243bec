"""cluster.yaml is a valid Ray cluster-launcher config with the node types the README names."""

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
