"""benchmarks/serve_latency.py --tiny, run as a user runs it, so the script cannot rot.

The benchmark runs in its own subprocess (each of its cells starts its own Ray and Serve
behind the ingress being measured, on a free 127.0.0.1 port) over the session's trained
demo run, so that building a run is not timed twice. Timings are not asserted (the machine
is shared): every figure must be a positive, finite number, no request may fail, and each
ratio must be the quotient of the figures beside it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FIGURES = ("p50_ms", "p99_ms", "rps")


@pytest.mark.slow
def test_serve_latency_tiny_writes_every_figure(demo_trained, tmp_path):
    output = tmp_path / "serve_latency.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)  # never join a running cluster
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve_latency", "--tiny", "--run-dir",
         str(demo_trained), "--output", str(output)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {output}" in proc.stdout
    results = json.loads(output.read_text())
    assert results["demo_run"] == str(demo_trained.resolve())
    cells = results["runs"]["demo"]
    assert [(c["ingress"], c["batching"]) for c in cells] == [("haproxy", True),
                                                               ("haproxy", False)]
    for cell in cells:
        assert cell["replica_rss_mib"] > 0
        for concurrency in ("c1", "c16"):
            for side in ("floor", "recommend"):
                r = cell[side][concurrency]
                assert r["requests"] > 0 and r["non_2xx"] == 0 and r["errors"] == 0, r
                for key in FIGURES:
                    assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0
                assert len(r["round_p50_ms"]) == 2  # two turns, alternating with the other
                assert min(r["round_p50_ms"]) <= r["p50_ms"] <= max(r["round_p50_ms"])
            rec, floor, ratio = (cell[k][concurrency] for k in ("recommend", "floor", "ratio"))
            assert ratio["p50"] == pytest.approx(rec["p50_ms"] / floor["p50_ms"], rel=1e-2)
            assert ratio["rps"] == pytest.approx(rec["rps"] / floor["rps"], rel=1e-2)
    table = proc.stdout.splitlines()
    assert sum(line.startswith("demo     haproxy") for line in table) == 4  # 2 cells x 2
