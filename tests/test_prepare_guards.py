"""Prepare's guards against inputs that silently multiply or skew the data.

Exact duplicate interactions (a table read twice), symlinked folders inside a table folder
(``again -> .``, ``up -> ..``), a file linked twice, and one user holding most of the
interactions. In process (``ray_data=False``) on the hand-made tables of conftest.
"""

from __future__ import annotations

import copy
import os
import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import Duplicates, PrepareConfig, parse_config
from prepare.run import run_prepare, validate_inputs
from tests.conftest import TINY_CONFIG


def tiny_cfg(root, **prepare):
    raw = copy.deepcopy(TINY_CONFIG)
    raw["data"]["root"] = str(root)
    raw["prepare"].update(prepare)
    return parse_config(raw)


def prepare(cfg, run_dir):
    logs: list[str] = []
    manifest = run_prepare(cfg, run_dir, log=logs.append, ray_data=False)
    return manifest, [m for m in logs if "warning" in m or "max_user" in m]


def split_rows(run_dir, name):
    table = pads.dataset(run_dir / "prepared" / name).to_table()
    return sorted((r["user_id"], r["item_id"], r["timestamp"]) for r in table.to_pylist())


def test_a_backup_copy_is_dropped_with_a_warning_that_counts_it(tiny_data, tmp_path):
    # the tables' 10 usable interactions hold 9 distinct (user, item, time): u3's (11, 7)
    # is there twice. A backup copy of the folder doubles them: 20 rows, 11 repeats.
    once, once_logs = prepare(tiny_cfg(tiny_data, duplicates="drop"), tmp_path / "once")
    assert once_logs == [
        "[prepare] warning: dropping 1 interactions repeat an earlier row's 'user_id', "
        "'item_id' and 'timestamp' exactly (a file read twice, e.g. a backup copy in a "
        "subfolder of the table's folder?); the first of each is kept (prepare.duplicates: "
        "drop; 'error' refuses such data, 'keep' trains on them)"]
    folder = tiny_data / "interactions"
    shutil.copytree(folder, tmp_path / "backup")
    shutil.move(tmp_path / "backup", folder / "backup")
    assert PrepareConfig().duplicates is Duplicates.DROP  # the default
    twice, logs = prepare(tiny_cfg(tiny_data, duplicates="drop"), tmp_path / "twice")
    assert twice.interactions_read == 22
    assert len(logs) == 1 and logs[0].startswith("[prepare] warning: dropping 11 interactions")
    assert twice.rows == once.rows
    for name in ("train", "validation", "test"):
        assert split_rows(tmp_path / "twice", name) == split_rows(tmp_path / "once", name)
    # every user's validation target differs from its test target again
    val = {u: i for u, i, _ in split_rows(tmp_path / "twice", "validation")}
    test = {u: i for u, i, _ in split_rows(tmp_path / "twice", "test")}
    assert val == {1: 13, 2: 12} and test == {1: 10, 2: 14}  # u3: 2 distinct, left out


def test_duplicates_error_names_the_file_and_row(tiny_data, tmp_path):
    # u3's second (11, 7) is row 2 of part-1 (rows: (14,3) (11,7) (11,7) (13,7) (99,8))
    with pytest.raises(ValueError, match=r"part-1.parquet, row 2: 1 interactions repeat .* "
                                         r"set prepare.duplicates: drop"):
        run_prepare(tiny_cfg(tiny_data, duplicates="error"), tmp_path / "run",
                    log=lambda m: None, ray_data=False)
    assert not (tmp_path / "run").exists()


def test_duplicates_keep_trains_on_them(tiny_data, tmp_path):
    manifest, logs = prepare(tiny_cfg(tiny_data, duplicates="keep"), tmp_path / "run")
    assert logs == [] and manifest.rows["train"] == 4  # u3: 11 train, 11 val, 13 test
    assert (3, 11, 7) in split_rows(tmp_path / "run", "validation")


def test_symlinked_folders_inside_a_table_are_not_followed(tiny_data, tmp_path):
    folder = tiny_data / "interactions"
    os.symlink(".", folder / "again")  # read the same files again and again
    os.symlink("..", folder / "up")  # would sweep users.parquet and items.parquet in
    files = validate_inputs(tiny_cfg(tiny_data))
    assert [os.path.basename(p) for p in files["interactions"].paths] == \
        ["part-0.parquet", "part-1.parquet"]
    assert sum(files["interactions"].rows) == 11
    manifest, _ = prepare(tiny_cfg(tiny_data), tmp_path / "run")
    assert manifest.interactions_read == 11


def test_a_file_linked_twice_into_a_table_is_refused(tiny_data):
    folder = tiny_data / "interactions"
    os.symlink(folder / "part-0.parquet", folder / "part-2.parquet")
    with pytest.raises(ValueError, match=r"part-2.parquet and .*part-0.parquet are the same "
                                         r"file"):
        validate_inputs(tiny_cfg(tiny_data))


def heavy_user(root, n=300):
    """Add user 9 with ``n`` interactions, times 100 .. 100 + n - 1, to the tables."""
    part = root / "interactions" / "part-2.parquet"
    items = [10, 11, 12, 13, 14]
    pq.write_table(pa.table({
        "user_id": [9] * n, "item_id": [items[i % 5] for i in range(n)],
        "timestamp": list(range(100, 100 + n)), "weight": [1.0] * n}), part)


def test_a_dominating_user_is_named_and_capped(tiny_data, tmp_path):
    heavy_user(tiny_data)
    _, logs = prepare(tiny_cfg(tiny_data), tmp_path / "all")
    assert logs == [
        "[prepare] warning: users holding more than 10% of the 310 interactions, and so of "
        "the training rows and windows: 9 300 (97%); set prepare.max_user_interactions to "
        "keep only each user's latest N"]
    manifest, logs = prepare(tiny_cfg(tiny_data, max_user_interactions=10), tmp_path / "cap")
    assert logs[1] == ("[prepare] prepare.max_user_interactions=10: left out 290 older "
                       "interactions of 1 user(s)")
    # u9 keeps its latest 10 (times 390..399): 8 train, 1 validation, 1 test; others as before
    train = [t for u, _, t in split_rows(tmp_path / "cap", "train") if u == 9]
    assert sorted(train) == list(range(390, 398))
    assert [t for u, _, t in split_rows(tmp_path / "cap", "test") if u == 9] == [399]
    assert manifest.rows["train"] == 4 + 8


def test_the_cap_cannot_be_below_the_floor():
    with pytest.raises(ValueError, match="max_user_interactions 3 is below "
                                         "min_user_interactions 4"):
        tiny_cfg("/tmp", min_user_interactions=4, max_user_interactions=3)


def invalid_text(values: list[bytes]) -> pa.Array:
    """A string array holding ``values`` as they are (pyarrow checks nothing on this path)."""
    ends = [0]
    for v in values:
        ends.append(ends[-1] + len(v))
    return pa.Array.from_buffers(pa.string(), len(values),
                                 [None, pa.array(ends, pa.int32()).buffers()[1],
                                  pa.py_buffer(b"".join(values))])


@pytest.mark.parametrize("table,column,values,where", [
    ("users.parquet", "gender", [b"F", b"\xff\xfeM", b"X"], "users table, file {}, row 1"),
    ("items.parquet", "title", [b"a", b"b", b"c", b"caf\xe9", b"e"],
     "items table, file {}, row 3"),
])
def test_non_utf8_text_names_the_table_file_row_and_column(tiny_data, tmp_path, table, column,
                                                           values, where):
    path = tiny_data / table
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.schema.get_field_index(column), column,
                                invalid_text(values)), path)
    with pytest.raises(ValueError) as err:
        run_prepare(tiny_cfg(tiny_data), tmp_path / "run", log=lambda m: None, ray_data=False)
    message = str(err.value)
    assert message.startswith(where.format(path) + f": column {column!r} holds bytes that "
                              "are not UTF-8 text"), message
    assert "\n" not in message
