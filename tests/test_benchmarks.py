"""The benchmark scripts' --tiny modes, run as the user runs them, so the scripts cannot rot.

Each script runs in its own subprocess (it starts its own Ray where it needs one) and
writes its JSON to a temporary file; the tests check the keys and that every figure is a
positive, finite number. Timings themselves are not asserted: the machine is shared.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, output: Path, timeout_s: int, *flags: str) -> dict:
    """``python -m benchmarks.<module> --tiny --output OUTPUT``; returns the JSON written."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)  # never join a running cluster
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--tiny", "--output", str(output),
         *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {output}" in proc.stdout
    return json.loads(output.read_text())


def assert_positive(figures: dict, keys: list[str]) -> None:
    for key in keys:
        value = figures[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, \
            f"{key}={value!r}"


@pytest.mark.slow
def test_prepare_throughput_tiny(tmp_path):
    results = run_benchmark("prepare_throughput", tmp_path / "prepare.json", 150)
    tiny = results["tiny"]
    for side in ("ray_data", "single_process"):
        assert_positive(tiny[side], ["rows", "seconds", "rows_per_s", "peak_rss_mib"])
        assert tiny[side]["rows"] == 3_000  # DEMO_SIZES["tiny"] interactions, all read
    assert_positive(tiny, ["throughput_ratio"])


@pytest.mark.slow
def test_train_throughput_tiny(tmp_path):
    results = run_benchmark("train_throughput", tmp_path / "train.json", 400)
    tiny = results["tiny"]
    keys = ["rows", "train_s", "samples_per_s", "val_s", "fit_s", "wall_s", "peak_rss_mib",
            "torch_threads"]
    for side, world in (("plain", 1), ("ray_1_worker", 1), ("ray_2_workers", 2)):
        figures = tiny[side]
        assert_positive(figures, keys)
        assert figures["epochs"] == 2 and len(figures["epoch_seconds"]) == 2
        # samples/s is all workers' rows over the epochs' seconds, nothing else
        assert figures["samples_per_s"] == pytest.approx(  # train_s is rounded to 1 ms
            figures["rows"] / figures["train_s"], rel=1e-2)
        assert figures["rows"] % (world * 256) == 0  # whole batches of 256 per worker
        assert figures["fit_s"] >= figures["train_s"] + figures["val_s"] - 1e-3
        assert figures["startup_s"] >= 0 and figures["wall_s"] > figures["fit_s"]
    for side in ("ray_1_worker", "ray_2_workers"):
        assert_positive(tiny[side], ["ray_init_s"])
        assert tiny[f"ratio_{side}"] == pytest.approx(
            tiny[side]["samples_per_s"] / tiny["plain"]["samples_per_s"], rel=1e-2)


def test_index_types_tiny(tmp_path):
    results = run_benchmark("index_types", tmp_path / "index.json", 120)
    size = results["10000"]
    assert size["items"] == 10_000 and size["k"] == 100
    assert_positive(size, ["generate_s", "exact_s", "threads"])
    assert set(size["indexes"]) == {"Flat", "HNSW32", "IVF", "IVF-PQ"}
    for name, figures in size["indexes"].items():
        assert_positive(figures, ["single_qps", "batch_qps", "batch_qps_faiss", "size_mib",
                                  "speedup_vs_flat"])
        assert figures["build_s"] >= 0 and 0 < figures["recall_at_100"] <= 1, name
    assert size["indexes"]["Flat"]["recall_at_100"] == 1.0  # exact vs the exact oracle
    assert size["indexes"]["Flat"]["speedup_vs_flat"] == 1.0
    assert size["indexes"]["IVF"]["factory"] == "IVF256,Flat"  # 4 sqrt(N)=400 > N/39=256


@pytest.mark.slow
def test_ml100k_quality_tiny(tmp_path):
    results = run_benchmark("ml100k_quality", tmp_path / "quality.json", 400)
    assert results["dataset"] == "tiny-demo" and len(results["runs"]) == 1
    run = results["runs"][0]
    for split in ("test", "validation"):
        figures = run[split]["exact"]
        assert set(figures) == {"HR@10", "HR@50", "HR@100", "NDCG@10"}
        assert all(0 <= v <= 1 for v in figures.values())
        assert figures["HR@10"] <= figures["HR@50"] <= figures["HR@100"]
    summary = results["summary"]
    assert summary["HR@50"]["mean"] == run["test"]["exact"]["HR@50"]
    assert summary["HR@50"]["std"] == 0.0 and run["wall_s"] > 0
    # tuned EASE, ALS and the SASRec-CE reference on the same prepared split, each chosen on
    # validation only (the reference over its dropout grid)
    assert [b["model"] for b in results["baselines"]] == [
        "EASE, tuned", "implicit ALS, tuned", "SASRec-CE (benchmarks/sasrec.py)"]
    assert len(results["baselines"][2]["tried"]) == 2
    for b in results["baselines"]:
        assert set(b["test"]) == {"HR@10", "HR@50", "HR@100", "NDCG@10"}
        assert all(0 <= v <= 1 for v in b["test"].values())
        assert b["validation"]["NDCG@10"] == max(t["NDCG@10"] for t in b["tried"])


def test_sequence_candidates_tiny(tmp_path):
    results = run_benchmark("sequence_candidates", tmp_path / "cand.json", 300)
    assert [r["items"] for r in results["rows"]] == [500, 3000]
    for row in results["rows"]:
        for side in ("full", "sampled"):
            assert row[side]["full"] is (side == "full")
            assert_positive(row[side], ["step_s", "positions_per_s", "peak_rss_mib"])
        assert row["full_over_sampled"] == pytest.approx(
            row["full"]["step_s"] / row["sampled"]["step_s"], rel=1e-2)


def test_sequence_speed_tiny(tmp_path):
    results = run_benchmark("sequence_speed", tmp_path / "speed.json", 300)
    assert_positive(results, ["ours_samples_per_s", "plain_samples_per_s", "ratio"])
    assert results["ratio"] == pytest.approx(
        results["ours_samples_per_s"] / results["plain_samples_per_s"], rel=0.01)
    assert results["turns"] == 2 and results["steps_per_turn"] == 3
