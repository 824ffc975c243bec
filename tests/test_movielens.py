"""MovieLens conversion: the real ML-100K, hand-written ML-1M and CSV folders, the job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import convert_movielens as job
from pipeline.config import load_config
from prepare import tables
from prepare.sources.movielens import (
    INTERACTIONS_SCHEMA,
    ITEMS_SCHEMA,
    USERS_SCHEMA,
    MovieLensFormat,
    convert_movielens,
    detect_format,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ml100k(ml100k_dir, tmp_path_factory) -> Path:
    """ML-100K converted once into a temporary folder (never into the repository)."""
    out = tmp_path_factory.mktemp("ml100k")
    assert convert_movielens(str(ml100k_dir), str(out)) == {
        "interactions": 100_000, "users": 943, "items": 1682,
    }
    return out


def rows_by_id(root: Path, table: str, key: str) -> dict[int, dict]:
    return {row[key]: row for row in read(root, table).to_pylist()}


def read(root: Path, table: str):
    return pq.read_table(root / table / "part-00000.parquet")


def write(folder: Path, files: dict[str, str], encoding: str = "utf-8") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_bytes(text.encode(encoding))
    return folder


# ----------------------------------------------------------------------------- ML-100K


def test_ml100k_schemas_and_config(ml100k):
    assert read(ml100k, "interactions").schema == INTERACTIONS_SCHEMA
    assert read(ml100k, "users").schema == USERS_SCHEMA
    assert read(ml100k, "items").schema == ITEMS_SCHEMA
    cfg = load_config(ROOT / "configs" / "ml100k.yaml")
    for name, columns in tables.required_columns(cfg).items():
        tables.validate_table(tables.resolve_files(name, str(ml100k / name)), columns)


def test_ml100k_hand_checked_items(ml100k):
    items = rows_by_id(ml100k, "items", "item_id")
    # u.item line 1: 1|Toy Story (1995)|01-Jan-1995||...|0|0|0|1|1|1|0... (flags 3, 4, 5)
    assert items[1] == {"item_id": 1, "title": "Toy Story", "release_year": 1995,
                        "genres": ["Animation", "Children's", "Comedy"]}
    # line 267: unknown||||1|0...: empty release date, genre flag 0 ("unknown")
    assert items[267] == {"item_id": 267, "title": "unknown", "release_year": None,
                          "genres": ["unknown"]}
    # the year comes from the release date column (27-Jun-1997), not the title's (1963)
    assert items[1252]["title"] == "Contempt (M\u00e9pris, Le)"
    assert items[1252]["release_year"] == 1997
    assert list(items)[:3] == [1, 2, 3] and list(items)[-1] == 1682


def test_ml100k_latin1_titles(ml100k):
    items = rows_by_id(ml100k, "items", "item_id")
    # byte 0xE9 on line 543, 0xC1 and 0xF6 on line 1633
    assert items[543]["title"] == "Mis\u00e9rables, Les"
    assert items[543]["genres"] == ["Drama", "Musical"]
    assert items[1633]["title"] == "\u00c1 k\u00f6ldum klaka (Cold Fever)"


def test_ml100k_hand_checked_users(ml100k):
    users = rows_by_id(ml100k, "users", "user_id")
    # u.user: 1|24|M|technician|85711, 943|22|M|student|77841, 74|39|M|scientist|T8H1N
    assert users[1] == {"user_id": 1, "age": 24, "gender": "M", "occupation": "technician",
                        "zip_prefix": "857"}
    assert users[943]["zip_prefix"] == "778" and users[943]["occupation"] == "student"
    assert users[74]["zip_prefix"] == "T8H"
    assert len(users) == 943


def test_ml100k_interactions_keep_line_order(ml100k, ml100k_dir):
    raw = np.loadtxt(ml100k_dir / "u.data", dtype=np.int64)  # user item rating ts
    table = read(ml100k, "interactions")
    assert table["user_id"].to_numpy().tolist() == raw[:, 0].tolist()
    assert table["item_id"].to_numpy().tolist() == raw[:, 1].tolist()
    assert table["timestamp"].to_numpy().tolist() == raw[:, 3].tolist()
    assert np.array_equal(table["rating"].to_numpy(), raw[:, 2].astype(np.float32))
    # first line 196 242 3 881250949, last line 12 203 3 879959583
    assert table.slice(0, 1).to_pylist()[0] == {"user_id": 196, "item_id": 242,
                                                "timestamp": 881250949, "rating": 3.0}
    assert table.slice(99_999).to_pylist()[0]["user_id"] == 12


# ----------------------------------------------------------------------------- layouts


def test_detect_format_and_errors_name_the_folder(ml100k_dir, tmp_path):
    assert detect_format(str(ml100k_dir)) is MovieLensFormat.ML_100K
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty' holds no MovieLens ratings.*u\.data"):
        detect_format(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing' is not an existing folder"):
        detect_format(str(tmp_path / "missing"))
    write(tmp_path / "csv", {"ratings.csv": "userId,movieId,rating,timestamp\n"})
    assert detect_format(str(tmp_path / "csv")) is MovieLensFormat.ML_CSV
    with pytest.raises(FileNotFoundError, match="looks like ml-csv but lacks movies.csv"):
        convert_movielens(str(tmp_path / "csv"), str(tmp_path / "out"))


ML1M_FILES = {
    "ratings.dat": "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n",
    "users.dat": "1::F::1::10::48067\n2::M::56::16::70072\n",
    "movies.dat": ("661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
                   "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
                   "73::Mis\u00e9rables, Les (1995)::Drama|Musical\n"),
}


def test_ml1m_tiny_folder(tmp_path):
    src = write(tmp_path / "ml-1m", ML1M_FILES, encoding="latin-1")
    out = tmp_path / "out"
    assert convert_movielens(str(src), str(out)) == {"interactions": 3, "users": 2, "items": 3}
    assert read(out, "interactions").to_pydict() == {
        "user_id": [1, 1, 2], "item_id": [1193, 661, 1193],
        "timestamp": [978300760, 978302109, 978298413], "rating": [5.0, 3.0, 4.0],
    }
    # occupation codes 10 and 16 of the ML-1M README; age stays the ML-1M age code
    assert read(out, "users").to_pydict() == {
        "user_id": [1, 2], "age": [1, 56], "gender": ["F", "M"],
        "occupation": ["K-12 student", "self-employed"], "zip_prefix": ["480", "700"],
    }
    assert read(out, "items").to_pydict() == {
        "item_id": [661, 1193, 73],
        "title": ["James and the Giant Peach", "One Flew Over the Cuckoo's Nest",
                  "Mis\u00e9rables, Les"],
        "genres": [["Animation", "Children's", "Musical"], ["Drama"], ["Drama", "Musical"]],
        "release_year": [1996, 1975, 1995],
    }


def test_csv_tiny_folder(tmp_path):
    src = write(tmp_path / "ml-latest", {
        "ratings.csv": ("userId,movieId,rating,timestamp\n3,1,4.0,964982703\n"
                        "1,3,3.5,964981247\n3,6,4.0,964982224\n"),
        "movies.csv": ("movieId,title,genres\n1,Toy Story (1995),Adventure|Animation\n"
                       '3,"American President, The (1995)",Comedy|Drama\n'
                       "6,Cit\u00e9 des enfants perdus (1995),(no genres listed)\n"
                       "7,Babylon 5,Sci-Fi\n"),
    })
    out = tmp_path / "out"
    assert convert_movielens(str(src), str(out)) == {"interactions": 3, "users": 2, "items": 4}
    assert read(out, "interactions").to_pydict() == {
        "user_id": [3, 1, 3], "item_id": [1, 3, 6],
        "timestamp": [964982703, 964981247, 964982224], "rating": [4.0, 3.5, 4.0],
    }
    assert read(out, "users").to_pydict() == {"user_id": [1, 3]}  # distinct, sorted
    assert read(out, "items").to_pydict() == {
        "item_id": [1, 3, 6, 7],
        "title": ["Toy Story", "American President, The", "Cit\u00e9 des enfants perdus",
                  "Babylon 5"],
        "genres": [["Adventure", "Animation"], ["Comedy", "Drama"], [], ["Sci-Fi"]],
        "release_year": [1995, 1995, 1995, None],
    }


@pytest.mark.parametrize("name, text, message", [
    # five fields on every line: pandas would have taken the first as a row index
    ("ratings.dat", "1::1193::5::978300760::9\n", "expected 4 fields separated by '::', found 5"),
    ("users.dat", "1::F::1::10\n", r"users.dat, line 1: expected 5 fields separated by '::'"),
    ("users.dat", "1::F::1::21::48067\n", "users.dat, line 1: unknown occupation code 21"),
    ("movies.dat", "661::A (1996)::Drama\n661::B (1997)::Drama\n",
     "movies.dat: item id 661 appears more than once"),
])
def test_malformed_ml1m_files_name_file_and_line(tmp_path, name, text, message):
    src = write(tmp_path / "ml-1m", {**ML1M_FILES, name: text}, encoding="latin-1")
    with pytest.raises(ValueError, match=message):
        convert_movielens(str(src), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "interactions").exists()  # nothing written


def test_refuses_other_parquet_files_in_output(tmp_path):
    src = write(tmp_path / "ml-1m", ML1M_FILES, encoding="latin-1")
    convert_movielens(str(src), str(tmp_path / "out"))
    convert_movielens(str(src), str(tmp_path / "out"))  # our own part files: overwritten
    (tmp_path / "out" / "items" / "old.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=r"other Parquet files: items/old.parquet"):
        convert_movielens(str(src), str(tmp_path / "out"))


# ----------------------------------------------------------------------------- the job


def test_job_prints_counts(tmp_path, capsys):
    src = write(tmp_path / "ml-1m", ML1M_FILES, encoding="latin-1")
    job.main(["--src", str(src), "--out", str(tmp_path / "out")])
    assert "3 interactions, 2 users, 3 items" in capsys.readouterr().out


def test_job_bad_folder_exits_1_with_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere' is not an existing folder" in err
