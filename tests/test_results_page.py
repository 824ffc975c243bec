"""docs/results.md and its plots come from the committed records in results/, by one command.

The committed page must equal what ``python -m jobs.docs`` renders from the records, each
record's section (its tables) must be on the page as :func:`reports.results_page.section`
makes it from that record, a figure changed in a scratch copy of the records must make
the check fail, and every plot the page shows must be committed and under 200 KB.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import docs as docs_job
from reports.records import RECORD_KEYS, read_record, read_records
from reports.results_page import HEADLINES, num, render, section

ROOT = Path(__file__).resolve().parents[1]
RESULTS, PAGE = ROOT / "results", ROOT / "docs" / "results.md"


def check(results: Path) -> int:
    with pytest.raises(SystemExit) as exit_:
        docs_job.main(["--only", "results", "--check", "--results", str(results)])
    return exit_.value.code


def first_number(value, path=()):
    """The key path of the first int/float leaf of a record's figures."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = first_number(v, (*path, k))
            if found is not None:
                return found
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return path
    return None


def test_page_is_rendered_from_the_committed_records():
    assert PAGE.read_text() == render(RESULTS), \
        "docs/results.md is stale: run `python -m jobs.docs --only results`"
    assert check(RESULTS) == 0


def test_each_table_on_the_page_is_its_record():
    page = PAGE.read_text()
    records = read_records(RESULTS)
    for name, record in records.items():
        assert RECORD_KEYS <= record.keys()
        assert section(name, record) in page, f"results/{name}.json's section differs"
        assert record["command"].startswith("python -m benchmarks.")
    # every table on the page sits in the section of one record
    for block in page.split("\n## ")[1:]:
        name = re.search(r"Record `results/([^`]+)\.json`", block).group(1)
        assert name in records


def test_a_changed_figure_fails_the_check(tmp_path):
    scratch = tmp_path / "results"
    shutil.copytree(RESULTS, scratch)
    name = sorted(read_records(scratch))[0]
    body = json.loads((scratch / f"{name}.json").read_text())
    path = first_number(body["figures"])
    node = body["figures"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = node[path[-1]] * 3 + 7
    (scratch / f"{name}.json").write_text(json.dumps(body))
    assert check(scratch) == 1


def test_plots_are_committed_and_small():
    shown = re.findall(r"!\[[^\]]*\]\(img/([^)]+)\)", PAGE.read_text())
    assert shown, "the page shows no plot"
    for file in shown:
        png = ROOT / "docs" / "img" / file
        assert png.exists(), f"docs/img/{file} is shown but not committed"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.stat().st_size < 200_000, f"docs/img/{file}: {png.stat().st_size} bytes"


def quality_record() -> dict:
    metrics = {"HR@10": 0.2, "HR@50": 0.5, "HR@100": 0.6, "NDCG@10": 0.1}
    return {
        "benchmark": "quality", "setting": "ml100k", "command": "python -m benchmarks.quality",
        "commit": "abc", "date": "2026-12-07T09:00:00+00:00",
        "machine": {"cores": 2, "memory_gib": 23.5, "cpu_model": "cpu"},
        "figures": {
            "summary": {**{k: {"mean": v, "std": 0.01} for k, v in metrics.items()},
                        "wall_s": {"mean": 180.0}},
            "runs": [{"seed": 0, "test": {"exact": metrics}, "wall_s": 180.0},
                     {"seed": 1, "test": {"exact": metrics}, "wall_s": 180.0,
                      "trained_on": ["train", "validation"]}],
            "references": {"SASRec (published)": {"HR@10": 0.0569, "HR@50": None,
                                                  "HR@100": None, "NDCG@10": 0.0314}},
            "baselines": [{"model": "EASE, tuned", "params": {"lambda": 100},
                           "test": {k: v / 2 for k, v in metrics.items()}}]}}


def test_quality_against_peers_and_an_unknown_benchmark(tmp_path):
    (tmp_path / "quality-ml100k.json").write_text(json.dumps(quality_record()))
    other = {**quality_record(), "benchmark": "scale", "setting": None,
             "figures": {"wall_s": {"10000": 1.5}}}
    (tmp_path / "scale.json").write_text(json.dumps(other))
    page = render(tmp_path, tmp_path / "img")
    # the mean +- std row from figures.summary, each baseline from figures.baselines
    assert "| **Towerline, mean ± std (2 runs)** | **0.2000 ± 0.0100** |" in page
    assert "| **0.1000 ± 0.0100** | 180 |" in page  # the mean seconds in the seconds column
    assert "| model | HR@10 | HR@50 | HR@100 | NDCG@10 | wall s |" in page
    assert "| EASE, tuned (lambda 100) | 0.1000 | 0.2500 | 0.3000 | 0.0500 |" in page
    assert "| Towerline, seed 0 | 0.2000 | 0.5000 | 0.6000 | 0.1000 | 180 |" in page
    assert "| `wall_s.10000` | 1.5000 |" in page  # any other record: its numbers
    assert "| SASRec (published) (EVALUATION.md) | 0.0569 |  |  | 0.0314 |  |" in page
    assert "| Towerline, seed 1, refit on train + validation | 0.2000 |" in page
    assert HEADLINES["quality"](quality_record()["figures"]) == (
        "Towerline HR@10 0.2000, NDCG@10 0.1000 (refit on train + validation); "
        "HR@10 of EASE, tuned 0.1000")
    png = tmp_path / "img" / "quality-ml100k.png"
    assert "(img/quality-ml100k.png)" in page and 0 < png.stat().st_size < 200_000


def test_read_record_names_a_file_that_is_not_a_record(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"figures": {}}))
    with pytest.raises(ValueError, match="x.json: not a benchmark record, missing"):
        read_record(bad)


def test_num_formats():
    assert (num(1234.5678, 1), num(12, 2), num(None), num(0.12345, 4)) == \
        ("1,234.6", "12", "", "0.1235")


def test_a_benchmark_writes_its_record(tmp_path):
    """``--record-dir`` takes the record; the machine, commit and command are in it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.index_types", "--tiny", "--output",
         str(tmp_path / "raw.json"), "--record-dir", str(tmp_path / "rec"), "--setting", "t"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    record = read_record(tmp_path / "rec" / "index_types-10000-t.json")
    assert record["command"] == shlex.join(
        ["python", "-m", "benchmarks.index_types", "--tiny", "--output",
         str(tmp_path / "raw.json"), "--record-dir", str(tmp_path / "rec"), "--setting", "t"])
    assert record["setting"] == "10000-t" and re.fullmatch(r"[0-9a-f]{10}( \(dirty\))?",
                                                             record["commit"])
    assert record["machine"]["cores"] >= 1 and record["machine"]["cpu_model"]
    assert record["figures"] == json.loads((tmp_path / "raw.json").read_text())["10000"]
    assert not list(RESULTS.glob("*-10000.json")) + list(RESULTS.glob("*-10000-*.json")), \
        "a --tiny run's record is never committed"
