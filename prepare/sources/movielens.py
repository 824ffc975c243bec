"""Convert a downloaded MovieLens folder into the project's three Parquet tables.

The layout is detected from the files in the folder:

* ``ml-100k``: ``u.data`` (tab-separated) and ``u.user``, ``u.item``, ``u.genre``
  (``|``-separated); latin-1.
* ``ml-1m``: ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``-separated); latin-1.
* ``ml-csv`` (ML-20M, ML-25M, ml-latest): ``ratings.csv`` and ``movies.csv`` with a header
  line; UTF-8. There is no user file.

Output, one Parquet file per table under ``OUT``:

* ``interactions/part-00000.parquet``: ``user_id`` int64, ``item_id`` int64,
  ``timestamp`` int64, ``rating`` float32, in the order of the lines of the ratings file
  (the evaluation protocol breaks timestamp ties by line number).
* ``users/part-00000.parquet``: ``user_id`` int64, ``age`` int64, ``gender`` string,
  ``occupation`` string, ``zip_prefix`` string (first 3 characters of the zip code).
  For ``ml-csv`` only ``user_id``: the distinct users of the ratings, sorted.
* ``items/part-00000.parquet``: ``item_id`` int64, ``title`` string (without the trailing
  ``" (YYYY)"``), ``genres`` list<string>, ``release_year`` int64 (nullable).

Users and items keep the order of their source files. MovieLens data may not be
redistributed: write ``OUT`` outside the repository. pyarrow, numpy and pandas only.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

PART_NAME = "part-00000.parquet"
TABLE_NAMES = ("interactions", "users", "items")

INTERACTIONS_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("item_id", pa.int64()),
    ("timestamp", pa.int64()),
    ("rating", pa.float32()),
])
USERS_SCHEMA = pa.schema([
    ("user_id", pa.int64()),
    ("age", pa.int64()),
    ("gender", pa.string()),
    ("occupation", pa.string()),
    ("zip_prefix", pa.string()),
])
CSV_USERS_SCHEMA = pa.schema([("user_id", pa.int64())])
ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.int64()),
    ("title", pa.string()),
    ("genres", pa.list_(pa.string())),
    ("release_year", pa.int64()),
])

#: ML-1M ``users.dat`` occupation codes (index = code), from the ML-1M README.
ML1M_OCCUPATIONS = (
    "other or not specified", "academic/educator", "artist", "clerical/admin",
    "college/grad student", "customer service", "doctor/health care",
    "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer",
    "tradesman/craftsman", "unemployed", "writer",
)

_LATIN1 = "latin-1"
_NO_GENRES = "(no genres listed)"
_TITLE_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_RELEASE_DATE = re.compile(r"^\d{1,2}-[A-Za-z]{3}-(\d{4})$")
_RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


class MovieLensFormat(Enum):
    """The MovieLens file layouts the converter understands."""

    ML_100K = "ml-100k"
    ML_1M = "ml-1m"
    ML_CSV = "ml-csv"


# The file that identifies each layout (checked in this order) and all the files it needs.
_MARKER = {
    MovieLensFormat.ML_100K: "u.data",
    MovieLensFormat.ML_1M: "ratings.dat",
    MovieLensFormat.ML_CSV: "ratings.csv",
}
_REQUIRED = {
    MovieLensFormat.ML_100K: ("u.data", "u.user", "u.item", "u.genre"),
    MovieLensFormat.ML_1M: ("ratings.dat", "users.dat", "movies.dat"),
    MovieLensFormat.ML_CSV: ("ratings.csv", "movies.csv"),
}


def detect_format(src: str) -> MovieLensFormat:
    """Tell which MovieLens layout a folder holds from the ratings file in it.

    Args:
        src: The folder the user downloaded and unpacked (e.g. ``.../ml-100k``).

    Returns:
        ``ML_100K`` if ``u.data`` is present, else ``ML_1M`` if ``ratings.dat`` is,
        else ``ML_CSV`` if ``ratings.csv`` is.

    Raises:
        ValueError: naming the folder and the files expected when none is present.
    """
    folder = Path(src)
    for fmt, marker in _MARKER.items():
        if (folder / marker).is_file():
            return fmt
    expected = ", ".join(f"{marker} ({fmt.value})" for fmt, marker in _MARKER.items())
    where = "is not an existing folder" if not folder.is_dir() else "holds no MovieLens ratings"
    raise ValueError(f"{str(folder)!r} {where}: expected one of {expected}")


def convert_movielens(src: str, out: str) -> dict[str, int]:
    """Convert a MovieLens folder into ``OUT/{interactions,users,items}/part-00000.parquet``.

    Everything is read and checked before anything is written; existing part files
    are overwritten.

    Args:
        src: The MovieLens folder (any layout :func:`detect_format` accepts).
        out: The output folder; created if missing. Keep it outside the repository.

    Returns:
        Row counts per table: ``{"interactions": n, "users": n, "items": n}``.

    Raises:
        ValueError: unknown layout, a malformed line (the message names file and line),
            or a table folder under ``out`` that already holds other Parquet files.
        FileNotFoundError: a file the detected layout needs is missing.
    """
    fmt = detect_format(src)
    folder, out_dir = Path(src), Path(out)
    missing = [name for name in _REQUIRED[fmt] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{str(folder)!r} looks like {fmt.value} but lacks {', '.join(missing)}"
        )
    _check_output(out_dir)
    tables = _READERS[fmt](folder)
    for name in TABLE_NAMES:
        (out_dir / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(tables[name], out_dir / name / PART_NAME)
    return {name: tables[name].num_rows for name in TABLE_NAMES}


# ----------------------------------------------------------------------------- layouts


def _read_ml100k(folder: Path) -> dict[str, pa.Table]:
    genre_names = _read_genre_names(folder / "u.genre")
    return {
        "interactions": _read_rating_lines(folder / "u.data", "\t"),
        "users": _read_ml100k_users(folder / "u.user"),
        "items": _read_ml100k_items(folder / "u.item", genre_names),
    }


def _read_ml1m(folder: Path) -> dict[str, pa.Table]:
    return {
        "interactions": _read_rating_lines(folder / "ratings.dat", "::"),
        "users": _read_ml1m_users(folder / "users.dat"),
        "items": _read_ml1m_items(folder / "movies.dat"),
    }


def _read_csv_layout(folder: Path) -> dict[str, pa.Table]:
    interactions = _read_ratings_csv(folder / "ratings.csv")
    user_ids = np.unique(interactions.column("user_id").to_numpy())
    return {
        "interactions": interactions,
        "users": pa.table({"user_id": user_ids}, schema=CSV_USERS_SCHEMA),
        "items": _read_movies_csv(folder / "movies.csv"),
    }


_READERS: dict[MovieLensFormat, Callable[[Path], dict[str, pa.Table]]] = {
    MovieLensFormat.ML_100K: _read_ml100k,
    MovieLensFormat.ML_1M: _read_ml1m,
    MovieLensFormat.ML_CSV: _read_csv_layout,
}


# ----------------------------------------------------------------------------- ratings


def _read_rating_lines(path: Path, sep: str) -> pa.Table:
    """``user item rating timestamp`` lines without header, kept in file order."""
    data = path.read_bytes()
    if sep != "\t":
        data = data.replace(sep.encode(), b"\t")
    try:
        # No names: with 4 names pandas would silently take a 5th field as the row index.
        frame = pd.read_csv(
            io.BytesIO(data), sep="\t", header=None, engine="c",
            dtype={0: "int64", 1: "int64", 2: "float64", 3: "int64"},
        )
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"{path}: not 4 numeric fields separated by {sep!r} ({err})") from err
    if frame.shape[1] != len(_RATING_COLUMNS):
        raise ValueError(f"{path}: expected 4 fields separated by {sep!r}, found {frame.shape[1]}")
    frame.columns = _RATING_COLUMNS
    return _interactions_table(
        frame["user_id"].to_numpy(), frame["item_id"].to_numpy(),
        frame["timestamp"].to_numpy(), frame["rating"].to_numpy(),
    )


def _read_ratings_csv(path: Path) -> pa.Table:
    """``ratings.csv`` (header ``userId,movieId,rating,timestamp``), kept in file order."""
    types = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(),
             "timestamp": pa.int64()}
    table = _read_csv(path, types)
    return _interactions_table(*(
        table.column(name).to_numpy() for name in ("userId", "movieId", "timestamp", "rating")
    ))


def _interactions_table(user_id, item_id, timestamp, rating) -> pa.Table:
    return pa.table({
        "user_id": np.asarray(user_id, dtype=np.int64),
        "item_id": np.asarray(item_id, dtype=np.int64),
        "timestamp": np.asarray(timestamp, dtype=np.int64),
        "rating": np.asarray(rating, dtype=np.float32),
    }, schema=INTERACTIONS_SCHEMA)


# ----------------------------------------------------------------------------- users


def _read_ml100k_users(path: Path) -> pa.Table:
    """``u.user``: ``id|age|gender|occupation|zip``."""
    rows = []
    for lineno, line in _lines(path, _LATIN1):
        uid, age, gender, occupation, zip_code = _fields(path, lineno, line, "|", 5)
        rows.append((_int(path, lineno, uid, "user id"), _int(path, lineno, age, "age"),
                     gender, occupation, zip_code))
    return _users_table(path, rows)


def _read_ml1m_users(path: Path) -> pa.Table:
    """``users.dat``: ``UserID::Gender::Age::Occupation::Zip-code``, occupation as a code."""
    rows = []
    for lineno, line in _lines(path, _LATIN1):
        uid, gender, age, code, zip_code = _fields(path, lineno, line, "::", 5)
        code_int = _int(path, lineno, code, "occupation code")
        if not 0 <= code_int < len(ML1M_OCCUPATIONS):
            raise ValueError(f"{path}, line {lineno}: unknown occupation code {code_int}")
        rows.append((_int(path, lineno, uid, "user id"), _int(path, lineno, age, "age"),
                     gender, ML1M_OCCUPATIONS[code_int], zip_code))
    return _users_table(path, rows)


def _users_table(path: Path, rows: list[tuple]) -> pa.Table:
    """Rows of ``(user_id, age, gender, occupation, zip)``; the zip becomes its prefix."""
    user_ids = [row[0] for row in rows]
    _check_unique(path, user_ids, "user id")
    return pa.table({
        "user_id": user_ids,
        "age": [row[1] for row in rows],
        "gender": [row[2].strip() for row in rows],
        "occupation": [row[3].strip() for row in rows],
        "zip_prefix": [row[4].strip()[:3] or None for row in rows],
    }, schema=USERS_SCHEMA)


# ----------------------------------------------------------------------------- items


def _read_genre_names(path: Path) -> list[str]:
    """``u.genre``: ``name|index`` lines (blank lines skipped), as a list ordered by index."""
    pairs = []
    for lineno, line in _lines(path, _LATIN1):
        name, index = _fields(path, lineno, line, "|", 2)
        pairs.append((_int(path, lineno, index, "genre index"), name))
    pairs.sort()
    if [index for index, _ in pairs] != list(range(len(pairs))):
        raise ValueError(f"{path}: genre indexes are not 0..{len(pairs) - 1}")
    return [name for _, name in pairs]


def _read_ml100k_items(path: Path, genre_names: list[str]) -> pa.Table:
    """``u.item``: id, title, release date, video date, URL, then one 0/1 flag per genre."""
    ids, titles, genres, years = [], [], [], []
    for lineno, line in _lines(path, _LATIN1):
        fields = _fields(path, lineno, line, "|", 5 + len(genre_names))
        flags = [flag.strip() for flag in fields[5:]]
        if set(flags) - {"0", "1"}:
            raise ValueError(f"{path}, line {lineno}: genre flags must be 0 or 1")
        ids.append(_int(path, lineno, fields[0], "item id"))
        titles.append(_split_title(fields[1])[0])
        years.append(_release_year(path, lineno, fields[2]))
        genres.append([name for name, flag in zip(genre_names, flags, strict=True) if flag == "1"])
    return _items_table(path, ids, titles, genres, years)


def _read_ml1m_items(path: Path) -> pa.Table:
    """``movies.dat``: ``MovieID::Title (YYYY)::Genre|Genre``."""
    ids, titles, genres, years = [], [], [], []
    for lineno, line in _lines(path, _LATIN1):
        item_id, raw_title, raw_genres = _fields(path, lineno, line, "::", 3)
        title, year = _split_title(raw_title)
        ids.append(_int(path, lineno, item_id, "item id"))
        titles.append(title)
        years.append(year)
        genres.append(_genre_list(raw_genres))
    return _items_table(path, ids, titles, genres, years)


def _read_movies_csv(path: Path) -> pa.Table:
    """``movies.csv`` (header ``movieId,title,genres``; titles may be quoted)."""
    table = _read_csv(path, {"movieId": pa.int64(), "title": pa.string(),
                             "genres": pa.string()})
    split = [_split_title(title) for title in table.column("title").to_pylist()]
    return _items_table(
        path,
        table.column("movieId").to_pylist(),
        [title for title, _ in split],
        [_genre_list(raw) for raw in table.column("genres").to_pylist()],
        [year for _, year in split],
    )


def _items_table(path: Path, ids: list, titles: list, genres: list, years: list) -> pa.Table:
    _check_unique(path, ids, "item id")
    return pa.table(
        {"item_id": ids, "title": titles, "genres": genres, "release_year": years},
        schema=ITEMS_SCHEMA,
    )


def _split_title(raw: str) -> tuple[str, int | None]:
    """``"Toy Story (1995)"`` -> ``("Toy Story", 1995)``; no trailing year -> ``None``."""
    match = _TITLE_YEAR.search(raw)
    if match is None:
        return raw.strip(), None
    return raw[: match.start()].strip(), int(match.group(1))


def _release_year(path: Path, lineno: int, raw: str) -> int | None:
    """``"01-Jan-1995"`` -> 1995; empty -> ``None``."""
    raw = raw.strip()
    if not raw:
        return None
    match = _RELEASE_DATE.match(raw)
    if match is None:
        raise ValueError(f"{path}, line {lineno}: release date {raw!r} is not like 01-Jan-1995")
    return int(match.group(1))


def _genre_list(raw: str | None) -> list[str]:
    """``"Action|Comedy"`` -> ``["Action", "Comedy"]``; ``"(no genres listed)"`` -> ``[]``."""
    return [g for g in (raw or "").strip().split("|") if g and g != _NO_GENRES]


# ----------------------------------------------------------------------------- helpers


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers, line endings removed."""
    with open(path, encoding=encoding, newline=None) as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                yield lineno, line.rstrip("\n")


def _fields(path: Path, lineno: int, line: str, sep: str, count: int) -> list[str]:
    fields = line.split(sep)
    if len(fields) != count:
        raise ValueError(
            f"{path}, line {lineno}: expected {count} fields separated by {sep!r}, "
            f"found {len(fields)}"
        )
    return fields


def _int(path: Path, lineno: int, raw: str, what: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{path}, line {lineno}: {what} {raw!r} is not an integer") from None


def _read_csv(path: Path, types: dict[str, pa.DataType]) -> pa.Table:
    """A UTF-8 CSV with a header; only the named columns, with the given types."""
    options = pacsv.ConvertOptions(column_types=types, include_columns=list(types))
    try:
        return pacsv.read_csv(path, convert_options=options)
    except (pa.ArrowInvalid, KeyError) as err:
        raise ValueError(f"{path}: expected columns {', '.join(types)} ({err})") from err


def _check_unique(path: Path, ids: list[int], what: str) -> None:
    if len(set(ids)) != len(ids):
        dup = pd.Series(ids)[pd.Series(ids).duplicated()].iloc[0]
        raise ValueError(f"{path}: {what} {dup} appears more than once")


def _check_output(out_dir: Path) -> None:
    """Refuse a table folder that holds Parquet files other than ours (readers take all)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output {str(out_dir)!r} exists and is not a folder")
    for name in TABLE_NAMES:
        folder = out_dir / name
        if not folder.is_dir():
            continue
        others = sorted(
            str(p.relative_to(out_dir)) for p in folder.rglob("*.parquet")
            if p != folder / PART_NAME
        )
        if others:
            raise ValueError(
                f"output {str(out_dir)!r} already holds other Parquet files: "
                f"{', '.join(others[:5])}; use an empty folder"
            )
