"""Convert a sequence file (``user item item ...`` per line, oldest first) into the three tables.

The format of the sequential-recommendation benchmarks (the S3-Rec / ICLRec copies of the
Amazon sets, Yelp, LastFM, ...) and of any event log that only keeps the order: one line
per user, the user id first, then the user's items in time order, separated by whitespace
(or ``sep``). There are no timestamps, ratings or features.

Output, one Parquet file per table under ``OUT``:

* ``interactions/part-00000.parquet``: ``user_id``, ``item_id`` and ``timestamp`` int64,
  the item's position on its user's line (0, 1, 2, ...): the time order of the line, with
  no ties, so the leave-last-out split takes the line's last item as the test target;
* ``users/part-00000.parquet``: ``user_id``, one row per line, in file order;
* ``items/part-00000.parquet``: ``item_id``, every distinct item, sorted.

Ids are int64 when every token of the file is an integer, else strings (``id_type``).
A repeated item on a line is kept (a repeat purchase is an interaction). pyarrow and
numpy only; the file is read once, line by line.
"""

from __future__ import annotations

import enum
import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prepare.sources.movielens import PART_NAME, TABLE_NAMES, _check_output


class IdType(str, enum.Enum):
    """Type of the user and item ids written."""

    AUTO = "auto"  # int64 when every id is an integer, else string
    INT = "int"
    STRING = "string"


def _open_text(path: Path):
    """A text handle on a plain or gzip-compressed file (UTF-8)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def read_sequence_lines(src: str, sep: str | None = None
                        ) -> tuple[list[str], list[str], np.ndarray]:
    """Users, items (flattened) and the number of items on each user's line.

    Args:
        src: the sequence file (``.gz`` is read compressed).
        sep: the separator; ``None`` splits on any whitespace.

    Returns:
        ``(users, items, lengths)``: one user token per non-blank line, every item token
        in file order, and [U] int64 items per line (a line may list none).

    Raises:
        ValueError: naming the file and line, for a user listed twice or a line whose
            tokens cannot be read.
    """
    path = Path(src)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} is not a file: expected lines 'user item item ...'")
    users: list[str] = []
    items: list[str] = []
    lengths: list[int] = []
    first_line: dict[str, int] = {}
    try:
        with _open_text(path) as handle:
            for lineno, line in enumerate(handle, start=1):
                tokens = line.split(sep) if sep else line.split()
                tokens = [t.strip() for t in tokens if t.strip()]
                if not tokens:
                    continue
                user = tokens[0]
                if user in first_line:
                    raise ValueError(f"{path}, line {lineno}: user {user!r} already has "
                                     f"line {first_line[user]}; one line per user")
                first_line[user] = lineno
                users.append(user)
                items.extend(tokens[1:])
                lengths.append(len(tokens) - 1)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None
    if not users:
        raise ValueError(f"{path}: no lines with a user id")
    if not items:
        raise ValueError(f"{path}: no line lists an item after its user id")
    return users, items, np.asarray(lengths, np.int64)


def _ids(tokens: list[str], id_type: IdType, what: str, src: str) -> pa.Array:
    """Tokens as an int64 array (all integers) or a string array."""
    if id_type is IdType.STRING:
        return pa.array(tokens, pa.string())
    try:
        return pa.array(np.asarray(tokens, dtype=np.int64))
    except (ValueError, OverflowError):
        if id_type is IdType.INT:
            bad = next(t for t in tokens if not _is_int(t))
            raise ValueError(f"{src}: {what} id {bad!r} is not an int64 integer; "
                             "use id_type string") from None
        return pa.array(tokens, pa.string())


def _is_int(token: str) -> bool:
    try:
        return -(2**63) <= int(token) < 2**63
    except ValueError:
        return False


def convert_sequences(src: str, out: str, sep: str | None = None,
                      id_type: IdType | str = IdType.AUTO) -> dict[str, int]:
    """Convert a sequence file into ``OUT/{interactions,users,items}/part-00000.parquet``.

    Args:
        src: the file, one line per user: ``user item item ...``, oldest item first.
        out: the output folder, created if missing; keep it outside the repository when
            the data's licence forbids redistribution.
        sep: the separator; ``None`` (default) splits on any whitespace.
        id_type: ``auto`` (int64 when every id is an integer, else string), ``int`` or
            ``string``; users and items are typed alike so both keys compare.

    Returns:
        Row counts per table and the line statistics: ``interactions``, ``users``,
        ``items``.

    Raises:
        ValueError: an unreadable file or line, or an output folder holding other Parquet.
    """
    id_type = IdType(id_type)
    users, items, lengths = read_sequence_lines(src, sep)
    _check_output(Path(out))
    user_ids = _ids(users, id_type, "user", src)
    item_ids = _ids(items, id_type, "item", src)
    if user_ids.type != item_ids.type:  # one column of strings makes both strings
        user_ids, item_ids = user_ids.cast(pa.string()), item_ids.cast(pa.string())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    positions = np.arange(len(items), dtype=np.int64) - starts  # [N] 0 at each line's start
    interactions = pa.table({
        "user_id": user_ids.take(pa.array(np.repeat(np.arange(len(users)), lengths))),
        "item_id": item_ids,
        "timestamp": pa.array(positions),
    })
    tables = {
        "interactions": interactions,
        "users": pa.table({"user_id": user_ids}),
        "items": pa.table({"item_id": pc.unique(item_ids).sort()}),
    }
    for name in TABLE_NAMES:
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        pq.write_table(tables[name], Path(out) / name / PART_NAME)
    return {name: tables[name].num_rows for name in TABLE_NAMES}
