"""jobs.convert_sequences: ``user item item ...`` lines -> the three tables, the line order kept."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prepare.sources.sequences import convert_sequences

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_lines_become_three_tables_with_the_line_order_as_time(tmp_path):
    src = write(tmp_path / "seqs.txt", "1 10 11 12\n\n2 11 10 11 13\n3\n")
    counts = convert_sequences(str(src), str(tmp_path / "out"))
    assert counts == {"interactions": 7, "users": 3, "items": 4}
    inter = pq.read_table(tmp_path / "out" / "interactions")
    assert inter.schema.types == [pa.int64()] * 3
    assert inter.column("user_id").to_pylist() == [1, 1, 1, 2, 2, 2, 2]
    assert inter.column("item_id").to_pylist() == [10, 11, 12, 11, 10, 11, 13]  # repeat kept
    assert inter.column("timestamp").to_pylist() == [0, 1, 2, 0, 1, 2, 3]  # no ties
    assert pq.read_table(tmp_path / "out" / "users").column("user_id").to_pylist() == [1, 2, 3]
    assert pq.read_table(tmp_path / "out" / "items").column("item_id").to_pylist() == \
        [10, 11, 12, 13]


def test_string_ids_make_both_keys_strings(tmp_path):
    src = write(tmp_path / "s.txt", "u1 B0001 B0002\nu2 B0002\n")
    convert_sequences(str(src), str(tmp_path / "out"))
    inter = pq.read_table(tmp_path / "out" / "interactions")
    assert inter.schema.field("user_id").type == inter.schema.field("item_id").type \
        == pa.string()
    assert inter.column("item_id").to_pylist() == ["B0001", "B0002", "B0002"]


@pytest.mark.parametrize(("text", "message"), [
    ("1 10\n2 11\n1 12\n", "line 3: user '1' already has line 1"),
    ("\n\n", "no lines with a user id"),
    ("1\n2\n", "no line lists an item"),
])
def test_bad_files_are_refused_with_the_line(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        convert_sequences(str(write(tmp_path / "bad.txt", text)), str(tmp_path / "out"))


def test_forced_int_ids_name_the_bad_token(tmp_path):
    src = write(tmp_path / "s.txt", "1 10 x7\n")
    with pytest.raises(ValueError, match="item id 'x7' is not an int64"):
        convert_sequences(str(src), str(tmp_path / "out"), id_type="int")


def test_job_prints_counts_and_the_split_takes_the_last_items(tmp_path):
    rng = np.random.default_rng(0)
    lines = [" ".join(map(str, [u, *rng.integers(1, 40, rng.integers(3, 9))]))
             for u in range(1, 31)]
    src = write(tmp_path / "s.txt", "\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "jobs.convert_sequences", "--src", str(src),
                          "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "30 users" in out.stdout
    from pipeline.splits import TEST
    from prepare.split import leave_last_out

    inter = pq.read_table(tmp_path / "out" / "interactions")
    users = inter.column("user_id").to_numpy()
    split = leave_last_out(users, inter.column("timestamp").to_numpy(), 3)
    rows = split.order[split.split == TEST]
    test = dict(zip(users[rows].tolist(), inter.column("item_id").to_numpy()[rows].tolist(),
                    strict=True))
    for line in lines:
        user, *items = map(int, line.split())
        assert test[user] == items[-1]  # the last item on the line is the test target
