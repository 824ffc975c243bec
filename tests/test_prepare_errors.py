"""Malformed inputs through ``jobs.prepare`` as a user meets them: one clear line each.

Every case starts from the tiny tables of ``conftest``, breaks one thing, and runs
``jobs.prepare.main(argv)`` in this process (one Ray for the whole matrix). Each must exit
non-zero with exactly one ``error:`` line naming the file (or the config file), the column
(or config key) and what is accepted, print no traceback, and leave the run directory
byte for byte as it was (an earlier ``prepared/`` stays; no ``.prepared.tmp``). Two cases
run as real ``python -m jobs.prepare`` subprocesses, joining the same Ray.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import prepare as prepare_job
from tests.conftest import ROOT, TINY_CONFIG, write_tiny_tables

PART0, PART1 = "interactions/part-0.parquet", "interactions/part-1.parquet"


@dataclass(frozen=True)
class Case:
    """One malformed input and the fragments its one error line must hold."""

    break_it: Callable[[Path, dict], list[str] | None]  # (data root, raw config) -> extra argv
    file: str  # the file (or config file) named
    column: str | None  # the column or config key named (None: the file itself is bad)
    accepted: str  # what the message says is accepted
    code: int = 1  # exit code: 1 data error, 2 config or flag error


def rewrite(path: Path, change: Callable[[pa.Table], pa.Table]) -> None:
    pq.write_table(change(pq.read_table(path)), path)


def set_column(path: Path, name: str, values: pa.Array) -> None:
    def change(t: pa.Table) -> pa.Table:
        if name in t.column_names:
            return t.set_column(t.column_names.index(name), name, values)
        return t.append_column(name, values)
    rewrite(path, change)


def edit(fn: Callable[[Path, dict], object]) -> Callable[[Path, dict], None]:
    return lambda root, cfg: (fn(root, cfg), None)[1]


def cast_column(rel: str, name: str, typ: pa.DataType | Callable) -> Callable:
    def change(root: Path, cfg: dict) -> None:
        path = root / rel
        values = pq.read_table(path)[name].to_pylist()
        arr = pa.array([typ(v) for v in values]) if callable(typ) else pa.array(values, typ)
        set_column(path, name, arr)
    return change


def emptied(*rels: str) -> Callable:
    def change(root: Path, cfg: dict) -> None:
        for rel in rels:
            rewrite(root / rel, lambda t: t.slice(0, 0))
    return change


def corrupt_page(root: Path, cfg: dict) -> None:
    """Overwrite data pages, keep the footer: only a real read finds it."""
    path = root / PART1
    pq.write_table(pq.read_table(path), path, compression="none")
    raw = bytearray(path.read_bytes())
    footer = len(raw) - 8 - pq.read_metadata(path).serialized_size  # magic + length after it
    raw[4:footer] = b"\xff" * (footer - 4)
    path.write_bytes(bytes(raw))


def tz_mixed(root: Path, cfg: dict) -> None:
    cast_column(PART0, "timestamp", pa.timestamp("s", tz="UTC"))(root, cfg)
    cast_column(PART1, "timestamp", pa.timestamp("s"))(root, cfg)


def impressions_not_lists(root: Path, cfg: dict) -> None:
    for rel, rows in ((PART0, 6), (PART1, 5)):
        set_column(root / rel, "shown", pa.array([1] * rows))
    cfg["loss"] = {"impressions_column": "shown"}


def impressions_of_another_key_type(root: Path, cfg: dict) -> None:
    for rel, rows in ((PART0, 6), (PART1, 5)):
        set_column(root / rel, "shown", pa.array([["a", "b"]] * rows))
    cfg["loss"] = {"impressions_column": "shown"}


def at_most_two_per_user(root: Path, cfg: dict) -> None:
    """u1 keeps 2 interactions, u2 and u3 one each; min_user_interactions 1 keeps them all."""
    for rel, keep in ((PART0, [True, True, False, False, False, False]),
                      (PART1, [True, True, False, False, False])):
        rewrite(root / rel, lambda t, keep=keep: t.filter(pa.array(keep)))
    cfg["prepare"]["min_user_interactions"] = 1


def unknown_items(root: Path, cfg: dict) -> None:
    for rel, rows in ((PART0, 6), (PART1, 5)):
        set_column(root / rel, "item_id", pa.array(range(100, 100 + rows)))


def write_config(root: Path, text: str) -> list[str]:
    (root / "bad.yaml").write_text(text)
    return ["--config", str(root / "bad.yaml")]


def config_set(section: str, **values) -> Callable:
    return edit(lambda root, cfg: cfg.setdefault(section, {}).update(values))


CASES: dict[str, Case] = {
    # -- the config and the flags (exit code 2)
    "unknown config key": Case(config_set("prepare", min_user_interaction=3), "cfg.yaml",
                               "prepare.min_user_interaction", "accepted here: "
                               "duplicates, local_max_rows, max_user_interactions, "
                               "min_user_interactions", 2),
    "unknown feature type": Case(edit(lambda r, c: c["features"]["item"][1].update(
        type="categorial")), "cfg.yaml", "features.item.1", "expected tags: 'categorical'", 2),
    "out-of-range value": Case(config_set("prepare", min_user_interactions=0), "cfg.yaml",
                               "prepare.min_user_interactions", "greater than or equal to 1", 2),
    "config not YAML": Case(lambda r, c: write_config(r, "data: [unclosed\n"), "bad.yaml",
                            "line", "a YAML mapping of sections", 2),
    "output dir is a file": Case(lambda r, c: ["--output-dir", str(r / PART0)], PART0,
                                 "--output-dir", "a run directory", 2),
    # -- where the tables are
    "missing file": Case(edit(lambda r, c: (r / "users.parquet").unlink()), "users.parquet",
                         "data.users", "accepted: a Parquet file, a folder"),
    "empty folder": Case(edit(lambda r, c: [p.unlink() for p in (r / "interactions").iterdir()]),
                         "interactions", "data.interactions", "the folder is empty"),
    "folder of CSV files": Case(edit(lambda r, c: [p.rename(p.with_suffix(".csv")) for p in
                                                   (r / "interactions").iterdir()]),
                                "part-0.csv", "data.interactions",
                                "a folder of .parquet files"),
    "glob matching nothing": Case(edit(lambda r, c: c["data"].update(
        interactions="interactions/*.pq")), "interactions/*.pq", "data.interactions",
        "a glob such as"),
    # -- files that are not Parquet
    "zero-byte .parquet": Case(edit(lambda r, c: (r / PART1).write_bytes(b"")), PART1, None,
                               "complete Parquet files only"),
    "random bytes .parquet": Case(edit(lambda r, c: (r / PART1).write_bytes(
        np.random.default_rng(0).bytes(2000))), PART1, None, "complete Parquet files only"),
    "corrupted footer": Case(edit(lambda r, c: (r / "items.parquet").write_bytes(
        (r / "items.parquet").read_bytes()[:-12] + b"\x00" * 8 + b"PAR1")), "items.parquet",
        None, "complete Parquet files only"),
    "corrupted data page": Case(edit(corrupt_page), PART1, None, "uncorrupted Parquet files only"),
    # -- columns and types, from the footers
    "missing column": Case(edit(lambda r, c: rewrite(r / PART1, lambda t: t.drop_columns(
        ["timestamp"]))), PART1, "'timestamp'", "the config needs it as integer (unix time) "
        "or timestamp"),
    "wrong timestamp type": Case(cast_column(PART0, "timestamp", str), PART0, "'timestamp'",
                                 "expected integer (unix time) or timestamp"),
    "wrong feature type": Case(cast_column("items.parquet", "price", str), "items.parquet",
                               "'price'", "expected"),
    "float key": Case(cast_column("users.parquet", "user_id", float), "users.parquet",
                      "'user_id'", "expected integer or string"),
    "tz-aware and naive timestamps": Case(edit(tz_mixed), PART1, "'timestamp'",
                                          "timestamps all naive or all in one time zone"),
    "integer and timestamp times": Case(cast_column(PART1, "timestamp", pa.timestamp("s")),
                                        PART1, "'timestamp'", "not integer in some files"),
    "string and integer item_id across files": Case(cast_column(PART1, "item_id", str), PART1,
                                                    "'item_id'", "all integer or all string"),
    "non-numeric string user_id against integers": Case(
        cast_column(PART1, "user_id", lambda v: f"u{v}"), PART1, "'user_id'",
        "all integer or all string"),
    "string item keys in items, integer in interactions": Case(
        cast_column("items.parquet", "item_id", str), "items.parquet", "'item_id'",
        "of one kind in every table"),
    "impressions not a list": Case(edit(impressions_not_lists), PART0, "'shown'",
                                   "list<integer> or list<string>"),
    "impression ids of another type than the item keys": Case(
        edit(impressions_of_another_key_type), "interactions", "'shown'",
        "item ids of the items table's key type"),
    "zero interactions in total": Case(emptied(PART0, PART1), PART0, "'user_id'",
                                       "at least prepare.min_user_interactions=3 per user"),
    "empty items table": Case(emptied("items.parquet"), "items.parquet", "'item_id'",
                              "at least one item"),
    # -- values, found after the read and located to their file and row
    "null timestamp": Case(edit(lambda r, c: set_column(r / PART1, "timestamp", pa.array(
        [3, 7, None, 7, 8], pa.int64()))), f"{PART1}, row 2", "'timestamp'",
        "integer unix time or a timestamp, never null"),
    "duplicate item keys": Case(edit(lambda r, c: set_column(r / "items.parquet", "item_id",
                                                             pa.array([10, 11, 12, 11, 14]))),
                                "items.parquet, row 1", "'item_id'", "one row per item"),
    "null user key": Case(edit(lambda r, c: set_column(r / "users.parquet", "user_id",
                                                       pa.array([1, None, 4]))),
                          "users.parquet, row 1", "'user_id'", "one non-null user id per row"),
    "negative weight": Case(edit(lambda r, c: set_column(r / PART1, "weight", pa.array(
        [1.0, 1.0, -1.0, 1.0, 1.0]))), f"{PART1}, row 2", "'weight'", "a finite number >= 0"),
    "NaN weight": Case(edit(lambda r, c: set_column(r / PART0, "weight", pa.array(
        [1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]))), f"{PART0}, row 1", "'weight'",
        "a finite number >= 0"),
    "dense vector of the wrong length": Case(
        edit(lambda r, c: set_column(r / "items.parquet", "embedding", pa.array(
            [[0.5, 1.0], [1.0, 0.0, 3.0], [0.0, 0.0], None, [2.0, 2.0]],
            pa.list_(pa.float32())))), "items.parquet, row 1", "'embedding'",
        "a list of exactly dim=2 numbers, or null"),
    "numeric column all null": Case(edit(lambda r, c: set_column(
        r / "items.parquet", "price", pa.nulls(5, pa.float64()))), "items.parquet", "'price'",
        "at least one finite number"),
    "no interaction item in the catalogue": Case(edit(unknown_items), "interactions",
                                                 "'item_id'", "whose 'item_id' is a key of "
                                                 "the items table"),
    "every user below min_user_interactions": Case(config_set("prepare",
                                                              min_user_interactions=10),
                                                   "interactions", "'user_id'",
                                                   "lower prepare.min_user_interactions to 4"),
    "min_user_interactions 1 with no training row": Case(
        edit(at_most_two_per_user), "interactions", "'user_id'",
        "set prepare.min_user_interactions: 3"),
}


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every path under ``folder`` (hidden ones too) with its bytes; None when it is absent."""
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(folder.rglob("*"))}


def setup_case(case: Case, tmp_path: Path) -> tuple[list[str], Path]:
    """Tiny tables broken one way, the config file, and a run dir with an older prepared/."""
    root = write_tiny_tables(tmp_path / "data")
    raw = copy.deepcopy(TINY_CONFIG)
    raw["data"]["root"] = str(root)
    extra = case.break_it(root, raw) or []
    (root / "cfg.yaml").write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "run"
    (run_dir / "prepared").mkdir(parents=True)
    (run_dir / "prepared" / "manifest.json").write_text('{"an": "earlier run"}')
    argv = ["--config", str(root / "cfg.yaml"), "--output-dir", str(run_dir), *extra]
    return argv, run_dir


def check_error_line(case: Case, code: int, out: str, err: str) -> str:
    assert code == case.code, (code, err[-2000:])
    assert "Traceback" not in out + err, (out + err)[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    line = lines[0]
    assert case.file in line, line
    if case.column is not None:
        assert case.column in line, line
    assert case.accepted in line, line
    return line


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_gives_one_clear_line(name, ray_session, tmp_path, capfd):
    case = CASES[name]
    argv, run_dir = setup_case(case, tmp_path)
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_info:
        prepare_job.main(argv)
    out, err = capfd.readouterr()
    line = check_error_line(case, exit_info.value.code, out, err)
    print(f"{name}: {line}")  # the matrix, with `pytest -s`
    assert snapshot(run_dir) == before


def test_the_matrix_has_at_least_30_kinds():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", ["random bytes .parquet", "corrupted data page"])
def test_the_command_line_behaves_the_same(name, ray_session, tmp_path):
    """A real ``python -m jobs.prepare``, joining this session's Ray (a fresh run dir)."""
    case = CASES[name]
    argv, run_dir = setup_case(case, tmp_path)
    fresh = tmp_path / "fresh-run"
    argv[argv.index("--output-dir") + 1] = str(fresh)
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    proc = subprocess.run([sys.executable, "-m", "jobs.prepare", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    check_error_line(case, proc.returncode, proc.stdout, proc.stderr)
    assert not fresh.exists()
