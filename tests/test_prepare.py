"""The prepare job end to end through Ray Data on hand-made tables."""

from __future__ import annotations

import copy
import json
import shutil

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from prepare.run import in_process, run_prepare, validate_inputs
from tests.conftest import TINY_CONFIG, demo_config


def tiny_cfg(root, loss=None, **prepare):
    raw = copy.deepcopy(TINY_CONFIG)
    raw["data"]["root"] = str(root)
    raw["prepare"].update(prepare)
    raw["loss"] = loss or {}
    return parse_config(raw)


def read_split(run_dir, name):
    table = pads.dataset(run_dir / "prepared" / name).to_table()
    order = [("user_id", "ascending")] + ([("timestamp", "ascending")]
                                          if "timestamp" in table.column_names else [])
    return table.sort_by(order).to_pylist()


@pytest.fixture
def prepared(ray_session, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    manifest = run_prepare(tiny_cfg(tiny_data), run_dir, log=lambda m: None)
    return run_dir, manifest


def test_in_process_prepare_writes_what_ray_data_writes(prepared, tiny_data, tmp_path):
    # the job's small-input path (prepare.local_max_rows) against the Ray Data path: every
    # split, the catalogue, the user table and the fitted state are the same
    ray_dir, _ = prepared
    local_dir = tmp_path / "local"
    cfg = tiny_cfg(tiny_data)
    files = validate_inputs(cfg)
    assert sum(files["interactions"].rows) == 11 and in_process(cfg, files)
    assert in_process(tiny_cfg(tiny_data, local_max_rows=11), files)
    assert not in_process(tiny_cfg(tiny_data, local_max_rows=10), files)
    assert not in_process(tiny_cfg(tiny_data, local_max_rows=0), files)
    manifest = run_prepare(cfg, local_dir, files=files, log=lambda m: None, ray_data=False)
    assert manifest.rows == {"train": 4, "validation": 3, "test": 3, "sequences": 1}
    for name in ("train", "validation", "test", "sequences"):
        assert read_split(local_dir, name) == read_split(ray_dir, name), name
    for name in ("items.parquet", "users.parquet", "feature_state.json"):
        a, b = (d / "prepared" / name for d in (local_dir, ray_dir))
        assert a.read_bytes() == b.read_bytes() if name.endswith(".json") else \
            pq.read_table(a).equals(pq.read_table(b)), name


def test_rows_histories_and_features(prepared):
    run_dir, manifest = prepared
    # u1: 11,12 train, 13 val, 10 test; u2: 10 train, 12 val, 14 test; u3: 11 / 11 / 13
    # sequences: one window of max_length + 1 = 4 for u1, the only user with 2 train items
    assert manifest.rows == {"train": 4, "validation": 3, "test": 3, "sequences": 1}
    state = json.loads((run_dir / "prepared" / "feature_state.json").read_text())
    # item ids fitted on training interactions only: 11 x2, 10 x1, 12 x1 (13, 14 are targets)
    assert state["item"]["features"]["item_id"]["vocab"] == [11, 10, 12]
    assert state["user"]["features"]["history"]["vocab_of"] == "item_id"
    test = read_split(run_dir, "test")
    assert [(r["user_id"], r["item_id"]) for r in test] == [(1, 10), (2, 14), (3, 13)]
    # u1 test history = 11, 12, 13 -> [2, 4, oov 1]; categories y, x, null -> [3, 2, 0]
    assert test[0]["user__history"] == [2, 4, 1]
    assert test[0]["user__history__category"] == [3, 2, 0]
    # u1's window: 11, 12 pre-padded -> catalogue rows [-1, -1, 1, 2], history ids
    # [0, 0, 2, 4], categories y, x -> [0, 0, 3, 2]; the static features as of the newest item
    (window,) = read_split(run_dir, "sequences")
    assert window["sequence_item_index"] == [-1, -1, 1, 2]
    assert window["user__history"] == [0, 0, 2, 4]
    assert window["user__history__category"] == [0, 0, 3, 2]
    assert window["sequence_weight"] == [0.0, 0.0, 1.0, 1.0]
    assert (window["user_id"], window["user__gender"]) == (1, test[0]["user__gender"])
    val = read_split(run_dir, "validation")
    assert val[0]["user__history"] == [0, 2, 4]  # training items only
    assert val[2]["user__history"] == [0, 0, 2]  # u3: first 11 only (tie broken by row)
    # u2 has a null age: filled with the mean 30 -> bucket 2, flagged missing
    assert (val[1]["user__age"], val[1]["user__age__missing"]) == (2, 1.0)
    # u3 is not in the user table: null features, but its id is known from training
    assert (val[2]["user__gender"], val[2]["user__user_id"]) == (0, 4)
    assert test[1]["item__tags"] == [4, 2]  # c, a (d truncated); vocab a, b, c, d
    assert test[0]["item__embedding"] == [0.5, 1.0]


def test_serving_tables(prepared):
    run_dir, _ = prepared
    items = pq.read_table(run_dir / "prepared" / "items.parquet")
    assert items["item_id"].to_pylist() == [10, 11, 12, 13, 14]
    users = pq.read_table(run_dir / "prepared" / "users.parquet").to_pylist()
    by_id = {u["user_id"]: u for u in users}
    assert set(by_id) == {1, 2, 3, 4}
    assert by_id[1]["user__history"] == [4, 1, 3]  # latest: 12, 13, 10
    assert by_id[1]["seen_item_index"] == [1, 2, 3, 0]
    assert by_id[4]["user__history"] == [0, 0, 0] and by_id[4]["user__user_id"] == 1


def test_two_runs_give_identical_state(ray_session, tiny_data, tmp_path):
    texts = []
    for name in ("a", "b"):
        run_prepare(tiny_cfg(tiny_data), tmp_path / name, log=lambda m: None)
        texts.append((tmp_path / name / "prepared" / "feature_state.json").read_bytes())
    assert texts[0] == texts[1]


def test_missing_column_names_file_and_writes_nothing(ray_session, tiny_data, tmp_path):
    bad = pq.read_table(tiny_data / "items.parquet").drop_columns(["price"])
    pq.write_table(bad, tiny_data / "items.parquet")
    with pytest.raises(ValueError, match=r"items table, file .*items.parquet: column 'price' "
                                         r"is missing"):
        run_prepare(tiny_cfg(tiny_data), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_wrong_type_names_file_and_column(ray_session, tiny_data, tmp_path):
    part = tiny_data / "interactions" / "part-1.parquet"
    t = pq.read_table(part)
    t = t.set_column(2, "timestamp", pa.array([str(v) for v in t["timestamp"].to_pylist()]))
    pq.write_table(t, part)
    with pytest.raises(ValueError, match=r"part-1.parquet: column 'timestamp' has type string"):
        run_prepare(tiny_cfg(tiny_data), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_null_weight_names_file_row_column_and_what_is_accepted(ray_session, tiny_data,
                                                                tmp_path):
    # negative and NaN weights go through jobs.prepare in tests/test_prepare_errors.py
    part = tiny_data / "interactions" / "part-1.parquet"
    t = pq.read_table(part)
    t = t.set_column(3, "weight", pa.array([1.0, 1.0, None, 1.0, 1.0], pa.float64()))
    pq.write_table(t, part)
    with pytest.raises(ValueError, match=r"part-1.parquet, row 2: column 'weight' \(data.weight\) "
                                         r"has 1 invalid weight\(s\), the first None; a weight "
                                         r"must be a finite number >= 0"):
        run_prepare(tiny_cfg(tiny_data), tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_users_below_the_minimum_keep_their_history_for_serving(ray_session, tiny_data,
                                                                 tmp_path):
    # keep u1 whole (4), u2 only (14, t3) -> 1 interaction, u3 only (11, t7) (13, t7) -> 2
    parts = [tiny_data / "interactions" / f"part-{i}.parquet" for i in (0, 1)]
    for part, keep in ((parts[0], [True] * 4 + [False, False]),
                       (parts[1], [True, False, True, True, False])):
        pq.write_table(pq.read_table(part).filter(pa.array(keep)), part)
    logs = []
    manifest = run_prepare(tiny_cfg(tiny_data, min_user_interactions=2), tmp_path / "run",
                           log=logs.append)
    # u2 is left out of the splits; u3 is kept with a validation and a test row only
    assert manifest.rows == {"train": 2, "validation": 2, "test": 2, "sequences": 1}
    assert [m for m in logs if "warning" in m] == [
        "[prepare] warning: 1 of 2 users kept have fewer than 3 interactions "
        "(prepare.min_user_interactions=2): they get no training row, only validation / test "
        "targets with one or no item of history; set prepare.min_user_interactions: 3 to "
        "leave them out"]
    users = {u["user_id"]: u for u in
             pq.read_table(tmp_path / "run" / "prepared" / "users.parquet").to_pylist()}
    # u2 consumed item 14 (catalogue row 4): serving's exclude_seen must know it; its history
    # id is OOV (1: only u1's training items 11, 12 are in the vocabulary), its category 'z'
    assert users[2]["seen_item_index"] == [4]
    assert users[2]["user__history"] == [0, 0, 1]
    state = json.loads((tmp_path / "run" / "prepared" / "feature_state.json").read_text())
    z = state["item"]["features"]["category"]["vocab"].index("z") + 2
    assert users[2]["user__history__category"] == [0, 0, z]
    assert users[3]["seen_item_index"] == [1, 3]  # 11, 13 (u3 is not in the user table)
    assert users[4]["seen_item_index"] == []  # in the user table, no interaction


def test_an_empty_user_table_gives_every_user_null_features(ray_session, tiny_data, tmp_path):
    users = pq.read_table(tiny_data / "users.parquet")
    pq.write_table(users.slice(0, 0).drop_columns(["age"]), tiny_data / "users.parquet")
    raw = copy.deepcopy(TINY_CONFIG)
    raw["data"]["root"] = str(tiny_data)
    raw["features"]["user"] = [f for f in raw["features"]["user"] if f["name"] != "age"]
    manifest = run_prepare(parse_config(raw), tmp_path / "run", log=lambda m: None)
    assert manifest.rows == {"train": 4, "validation": 3, "test": 3, "sequences": 1}
    test = read_split(tmp_path / "run", "test")
    assert [r["user__gender"] for r in test] == [0, 0, 0]  # null: no user row


def test_impressions_written_as_catalogue_rows_padded(ray_session, tiny_data, tmp_path):
    # file rows (user, item) and their impressions; catalogue rows 10..14 -> 0..4, 99 unknown
    shown = [[12, 99, 14, 11],  # (1, 10) test: 99 dropped -> [2, 4, 1] -> first 2: [2, 4]
             [13], [10, 11], [],  # (1, 11) train, (1, 12) train, (1, 13) validation
             [14], [11], None,  # (2, 10) train, (2, 12) validation, (2, 14) test: null list
             [12], [], [99, 10],  # (3, 11) train, (3, 11) validation, (3, 13) test
             [10]]  # (3, 99): the interaction itself is dropped
    parts = [tiny_data / "interactions" / f"part-{i}.parquet" for i in (0, 1)]
    lists = pa.array(shown, pa.list_(pa.int32()))  # int32 ids against int64 item keys
    for part, lo, hi in ((parts[0], 0, 6), (parts[1], 6, 11)):
        pq.write_table(pq.read_table(part).append_column("shown", lists[lo:hi]), part)
    cfg = tiny_cfg(tiny_data, loss={"impressions_column": "shown", "max_impressions": 2})
    run_prepare(cfg, tmp_path / "run", log=lambda m: None)
    got = {name: [r["impressions"] for r in read_split(tmp_path / "run", name)]
           for name in ("train", "validation", "test")}
    assert got == {"train": [[3, -1], [0, 1], [4, -1], [2, -1]],
                   "validation": [[-1, -1], [1, -1], [-1, -1]],
                   "test": [[2, 4], [-1, -1], [0, -1]]}
    schema = pq.read_schema(next((tmp_path / "run" / "prepared" / "test").glob("*.parquet")))
    assert schema.field("impressions").type == pa.list_(pa.int64(), 2)


def test_a_failed_atomic_write_leaves_no_folder_it_created(tmp_path):
    from pipeline.run_dir import atomic_dir

    kept = tmp_path / "existing"
    kept.mkdir()
    with pytest.raises(ValueError, match="boom"):
        with atomic_dir(kept / "new" / "run" / "prepared") as tmp:
            (tmp / "part.parquet").write_bytes(b"x")
            raise ValueError("boom")
    assert [p.name for p in tmp_path.rglob("*")] == ["existing"]
    with pytest.raises(ValueError, match="boom"):
        with atomic_dir(kept / "prepared") as tmp:
            raise ValueError("boom")
    assert list(kept.iterdir()) == []  # the folder that was there stays, emptied of the tmp


def test_a_table_row_is_located_to_its_file_past_empty_files():
    import pyarrow.fs as pafs

    from pipeline.errors import TableError
    from prepare import tables

    # files of 2, 0 and 3 rows: table rows 0-1 are a's, 2-4 are c's (b is empty)
    tf = tables.TableFiles("items", "/d", pafs.LocalFileSystem(),
                       ["/d/a.parquet", "/d/b.parquet", "/d/c.parquet"], (2, 0, 3))
    assert [tables.locate(tf, r) for r in range(5)] == [
        ("/d/a.parquet", 0), ("/d/a.parquet", 1), ("/d/c.parquet", 0), ("/d/c.parquet", 1),
        ("/d/c.parquet", 2)]
    with pytest.raises(IndexError, match="row 5 is beyond the 5 rows"):
        tables.locate(tf, 5)
    files = {"items": tf}
    assert str(tables.locate_error(TableError("bad", "items", 3), files)) == \
        "items table, file /d/c.parquet, row 1: bad"
    assert str(tables.locate_error(TableError("bad", "items"), files)) == \
        "items table at '/d' (3 file(s)): bad"


def test_jobs_after_prepare_refuse_keys_that_prepare_fixed(demo_prepared, demo_data, tmp_path):
    from pipeline.run_dir import RunDir, require_prepared_as
    from training.loop import run_plain

    run = RunDir(demo_prepared)
    assert require_prepared_as(run, demo_config(demo_data)).config == demo_config(demo_data)
    # what prepare does not bake in may change: the data's place, the model, training
    require_prepared_as(run, demo_config(demo_data, "data.root=/elsewhere", "train.lr=0.5",
                                         "model.output_dim=8", "prepare.num_cpus=2"))
    wider = demo_config(demo_data, "features.item.0.embedding_dim=48",
                        "prepare.min_user_interactions=4")
    with pytest.raises(ValueError, match=r"features\.item\.0\.embedding_dim: 16 -> 48; "
                                         r"prepare\.min_user_interactions: \d+ -> 4\).*"
                                         r"re-run `python -m jobs\.prepare`"):
        require_prepared_as(run, wider)
    copy = tmp_path / "run"
    shutil.copytree(demo_prepared / "prepared", copy / "prepared")
    with pytest.raises(ValueError, match=r"features\.item\.0\.embedding_dim: 16 -> 48"):
        run_plain(wider, copy, log=lambda m: None)  # the training job refuses before a step
    assert not (copy / "model").exists()
