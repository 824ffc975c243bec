"""benchmarks/serve_latency.py: the figures of several Ray starts of one cell."""

from __future__ import annotations

import pytest


def test_a_cell_of_several_ray_starts_takes_the_median_of_each_figure():
    from benchmarks.serve_latency import merge_starts, with_ratios

    def start(rec_p50, floor_p50, rss):
        def fig(p50, rps):
            return {"requests": 100, "p50_ms": p50, "p99_ms": 10 * p50, "rps": rps,
                    "non_2xx": 0, "errors": 1, "tool": "wrk",
                    "round_p50_ms": [p50 - 0.01, p50, p50 + 0.01]}
        return {"ingress": "haproxy", "batching": True, "start_s": rss / 100,
                "server": {"num_cpus": 0.5}, "replica_rss_mib": rss,
                "recommend": {"c1": fig(rec_p50, 1000.0)},
                "floor": {"c1": fig(floor_p50, 1300.0)}}

    cell = with_ratios(merge_starts([start(0.9, 0.7, 500), start(0.8, 0.75, 520),
                                     start(1.2, 0.6, 510)]))
    rec, floor = cell["recommend"]["c1"], cell["floor"]["c1"]
    assert (rec["p50_ms"], floor["p50_ms"], rec["p99_ms"]) == (0.9, 0.7, 9.0)
    assert rec["start_p50_ms"] == [0.9, 0.8, 1.2] and len(rec["round_p50_ms"]) == 9
    assert (rec["requests"], rec["errors"], rec["rps"]) == (300, 3, 1000.0)
    assert cell["ratio"]["c1"]["p50"] == pytest.approx(0.9 / 0.7, rel=1e-3)
    assert (cell["replica_rss_mib"], cell["start_s"], cell["starts"]) == (510.0, 5.1, 3)
    assert cell["server"] == {"num_cpus": 0.5} and cell["batching"] is True
    one = start(0.9, 0.7, 500)
    assert merge_starts([one]) is one  # one start: the cell as measured
