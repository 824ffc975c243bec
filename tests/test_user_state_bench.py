"""benchmarks/user_state.py --tiny, run as a user runs it, so the script cannot rot.

Over the session's trained demo run (its model and catalogue serve the generated
audiences of 1,000 and 10,000 users), in a subprocess with its own Ray, Serve and
redis-server. Timings are not asserted (the machine is shared); what must hold: every
request answered, every ratio the quotient of the figures beside it, and an event seen by
the very next /recommend on both stores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_user_state_tiny_writes_every_figure(demo_trained, tmp_path):
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (scripts/setup_env.sh installs it)")
        pytest.skip("redis-server is not installed")
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)  # never join a running cluster
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.user_state", "--tiny", "--base-run",
         str(demo_trained), "--work", str(tmp_path / "work"), "--record-dir",
         str(tmp_path / "records")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    record = json.loads(next((tmp_path / "records").glob("user_state*.json")).read_text())
    f = record["figures"]
    assert record["command"].startswith("python -m benchmarks.user_state --tiny")
    for store in ("embedded", "memory"):
        assert set(f["replica_rss_mib"][store]) == {"1000", "10000"}
        assert all(v > 100 for v in f["replica_rss_mib"][store].values())
    rss = f["replica_rss_mib"]["embedded"]
    assert f["embedded_rss_growth_mib"] == pytest.approx(rss["10000"] - rss["1000"], abs=0.1)
    for store in ("memory", "embedded", "redis"):
        for c in ("c1", "c16"):
            r = f["recommend"][store][c]
            assert r["requests"] > 0 and r["non_2xx"] == 0 and r["errors"] == 0, r
    for store in ("embedded", "redis"):
        for c in ("c1", "c16"):
            assert f["known_user_p50_ratio"][store][c] == pytest.approx(
                f["recommend"][store][c]["p50_ms"] / f["recommend"]["memory"][c]["p50_ms"],
                rel=1e-2)
        effect = f["event_to_effect_ms"][store]
        assert effect["recommends_needed_max"] == 1 and effect["p50_ms"] > 0
    events = f["events"]
    assert events["one_per_request_c16"]["non_2xx"] == 0 and f["events_per_s"] > 0
    assert events["lists_of_100_c16"]["non_2xx"] == 0
