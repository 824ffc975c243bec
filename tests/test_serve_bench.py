"""benchmarks/serve_latency.py --tiny, run as a user runs it, so the script cannot rot.

The benchmark runs in its own subprocess (its own Ray and Serve on a free 127.0.0.1
port) over the session's trained demo run, so that building a run is not timed twice.
Timings are not asserted (the machine is shared): every figure must be a positive,
finite number and each ratio must be the quotient of the figures beside it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FIGURES = ("p50_ms", "p99_ms", "rps", "seconds")


@pytest.mark.slow
def test_serve_latency_tiny_writes_every_figure(demo_trained, tmp_path):
    output = tmp_path / "serve_latency.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)  # never join a running cluster
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve_latency", "--tiny", "--run-dir",
         str(demo_trained), "--output", str(output)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {output}" in proc.stdout
    results = json.loads(output.read_text())
    assert results["items"] == 120 and results["run_dir"] == str(demo_trained.resolve())
    for concurrency in ("c1", "c16"):
        r = results[concurrency]
        for side in ("floor", "recommend"):
            assert r[side]["requests"] == 40
            for key in FIGURES:
                value = r[side][key]
                assert isinstance(value, float) and math.isfinite(value) and value > 0, key
        assert r["ratio"]["p50"] == pytest.approx(
            r["recommend"]["p50_ms"] / r["floor"]["p50_ms"], rel=1e-2)
        assert r["ratio"]["rps"] == pytest.approx(r["recommend"]["rps"] / r["floor"]["rps"],
                                                  rel=1e-2)
