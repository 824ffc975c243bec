"""Table locations, schema validation and naming the file behind a bad row (pyarrow only).

A table path may be a file, a folder of Parquet files or a glob, on any filesystem
pyarrow understands (local, s3://, gs://, ...). Validation reads only the Parquet
footers, file by file, so an error names the file and the column before any work starts:
an unreadable file, a missing or mistyped column, a column whose type differs between
files (e.g. integer and string keys, or timestamps with and without a time zone), or a
table with no rows. The footers' row counts then map a row of the concatenated table
back to its file (:func:`locate_error`), for the checks that need the data.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline.errors import TableError
from pipeline.features import numeric, spec_of
from pipeline.features.base import is_list_of, is_scalar_key

_GLOB = set("*?[")


ACCEPTED_PATHS = ("a Parquet file, a folder of .parquet files (names starting with '_' or '.' "
                  "are skipped; symlinked folders inside it are not followed) or a glob such "
                  "as 'DIR/*.parquet'")


@dataclass(frozen=True)
class TableFiles:
    """The resolved Parquet files of one table and the filesystem they live on.

    Attributes:
        rows: each file's row count from its footer (filled by :func:`validate_table`).
    """

    name: str
    uri: str
    filesystem: pafs.FileSystem
    paths: list[str]
    rows: tuple[int, ...] = ()

    def describe(self) -> str:
        """``items table at 'URI' (N file(s))``: the table as an error names it."""
        return f"{self.name} table at {self.uri!r} ({len(self.paths)} file(s))"


def resolve_files(name: str, uri: str) -> TableFiles:
    """List the Parquet files behind a file / folder / glob path, sorted by path.

    Raises:
        FileNotFoundError: naming the table, the path, what was found there and the
            accepted forms when no Parquet file matches.
    """
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(uri)
    found = ""
    if _GLOB & set(path):
        base = path[: min(path.index(c) for c in _GLOB if c in path)].rsplit("/", 1)[0]
        infos = _listing(fs, base)
        paths = [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path)]
        found = "the glob matches no file"
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            paths = [path]
        elif info.type == pafs.FileType.Directory:
            infos = [i for i in _listing(fs, path) if i.is_file]
            paths = [i.path for i in infos if _is_data_file(i.path)]
            others = [os.path.basename(i.path) for i in infos][:3]
            found = (f"the folder holds no .parquet file (found {others})" if others
                     else "the folder is empty")
        else:
            paths = []
            found = "nothing exists at that path"
    if not paths:
        raise FileNotFoundError(f"{name} table (data.{name}): no Parquet files at {uri!r}: "
                                f"{found}; accepted: {ACCEPTED_PATHS}")
    if isinstance(fs, pafs.LocalFileSystem):
        _check_distinct(name, paths)
    return TableFiles(name, uri, fs, sorted(paths))


def _listing(fs: pafs.FileSystem, base: str) -> list[pafs.FileInfo]:
    """Everything under ``base`` (nothing when it does not exist).

    On a local disk, symlinked folders are not followed: a link back up the tree
    (``again -> .``, ``up -> ..``) would list the same files again, or another table's.
    """
    if not isinstance(fs, pafs.LocalFileSystem):
        return fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    found = []
    for folder, _, files in os.walk(base, followlinks=False):  # linked folders: not entered
        found += [os.path.join(folder, f) for f in files]
    return fs.get_file_info(found) if found else []


def _check_distinct(name: str, paths: list[str]) -> None:
    """Refuse two listed paths that are one file (a symlink to a file of the same table)."""
    seen: dict[str, str] = {}
    for path in sorted(paths):
        real = os.path.realpath(path)
        if real in seen:
            raise ValueError(f"{name} table (data.{name}): {path} and {seen[real]} are the "
                             f"same file ({real}); it would be read twice; accepted: each "
                             "file once (remove the link)")
        seen[real] = path


def _is_data_file(path: str) -> bool:
    base = os.path.basename(path)
    return base.endswith(".parquet") and not base.startswith(("_", "."))


# Table columns that are not feature inputs; a feature column is checked by its kind.
_COLUMN_KINDS = {
    "key": (is_scalar_key, "integer or string"),
    "timestamp": (lambda t: pa.types.is_integer(t) or pa.types.is_timestamp(t),
                  "integer (unix time) or timestamp"),
    "id_list": (lambda t: is_list_of(t, pa.types.is_integer, pa.types.is_string),
                "list<integer> or list<string> of item ids"),
    "weight": (numeric.SPEC.accepts, numeric.SPEC.accepted),  # read as a numeric feature
}


def _kind_ok(kind: str, typ: pa.DataType) -> bool:
    if kind in _COLUMN_KINDS:
        return _COLUMN_KINDS[kind][0](typ)
    return spec_of(kind).accepts(typ)


def accepted(kind: str) -> str:
    """The Arrow types a column of ``kind`` (a feature kind, "key", ...) accepts, in words."""
    if kind in _COLUMN_KINDS:
        return _COLUMN_KINDS[kind][1]
    return spec_of(kind).accepted


def required_columns(cfg: C.Config) -> dict[str, dict[str, str]]:
    """Per table, the columns the config needs and the kind each must be."""
    d = cfg.data
    inter = {d.user_id: "key", d.item_id: "key", d.timestamp: "timestamp"}
    if d.weight:
        inter[d.weight] = "weight"
    if cfg.loss.impressions_column:
        inter[cfg.loss.impressions_column] = "id_list"
    users: dict[str, str] = {d.user_id: "key"}
    items: dict[str, str] = {d.item_id: "key"}
    for feats, table in ((cfg.features.user, users), (cfg.features.item, items)):
        for f in feats:
            spec = spec_of(f.type)
            if spec.table_column:
                table.setdefault(f.source, spec.kind.value)
    return {"interactions": inter, "users": users, "items": items}


def read_footer(files: TableFiles, path: str) -> pq.FileMetaData:
    """The Parquet footer of one file of a table.

    Raises:
        ValueError: naming the table and the file when it is not readable Parquet
            (empty, truncated, another format).
    """
    try:
        return pq.read_metadata(path, filesystem=files.filesystem)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{files.name} table, file {path}: not a readable Parquet file "
                         f"({one_line(err)}); accepted: complete Parquet files only under "
                         f"data.{files.name} (rewrite this file or move it away)") from None


def one_line(err: BaseException) -> str:
    """An exception's text on one line (pyarrow's messages span several)."""
    return " ".join(str(err).split())


def validate_table(files: TableFiles, columns: dict[str, str]) -> TableFiles:
    """Check every file's footer for the needed columns and types, the same in every file.

    Returns:
        ``files`` with each file's row count (``rows``).

    Raises:
        ValueError: naming the file, the column, the type found and the types accepted;
            or the two files whose types for a column cannot be read as one column.
    """
    rows, first = [], {}  # column -> (type, path) of the first file
    for path in files.paths:
        meta = read_footer(files, path)
        schema = meta.schema.to_arrow_schema()
        rows.append(meta.num_rows)
        for col, kind in columns.items():
            if col not in schema.names:
                raise ValueError(
                    f"{files.name} table, file {path}: column {col!r} is missing "
                    f"(the config needs it as {accepted(kind)}; found {schema.names})"
                )
            typ = schema.field(col).type
            if not _kind_ok(kind, typ):
                raise ValueError(
                    f"{files.name} table, file {path}: column {col!r} has type {typ}, "
                    f"expected {accepted(kind)} for a {kind} column"
                )
            first.setdefault(col, (typ, path))
            _check_same_type(files.name, col, first[col], (typ, path))
    return replace(files, rows=tuple(rows))


def _check_same_type(table: str, column: str, first: tuple[pa.DataType, str],
                     other: tuple[pa.DataType, str]) -> None:
    """Raise unless two files' types of a column merge into one (as the reader merges them)."""
    try:
        pa.unify_schemas([pa.schema([(column, first[0])]), pa.schema([(column, other[0])])],
                         promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        raise ValueError(
            f"{table} table, file {other[1]}: column {column!r} has type {other[0]}, but file "
            f"{first[1]} has {first[0]}; accepted: one type in every file (all integer or "
            "all string keys; timestamps all naive or all in one time zone, not integer in "
            "some files)") from None


def key_kind(typ: pa.DataType) -> str:
    """"integer" or "string": the kind of a key column's type (keys are compared by kind)."""
    return "integer" if pa.types.is_integer(typ) else "string"


def check_empty(files: TableFiles, needs: str) -> None:
    """Raise when the footers of a validated table count no row at all.

    Args:
        files: the validated table.
        needs: what the table must hold, in words, for the message.
    """
    if not sum(files.rows):
        raise ValueError(f"{files.describe()}: every file has 0 rows "
                         f"({', '.join(files.paths[:3])}); accepted: {needs}")


def locate(files: TableFiles, row: int) -> tuple[str, int]:
    """The file and the row within it of row ``row`` of the table read in file order."""
    ends = np.cumsum(files.rows)
    i = int(np.searchsorted(ends, row, side="right"))
    if not files.rows or i >= len(files.paths):
        raise IndexError(f"row {row} is beyond the {int(ends[-1]) if len(ends) else 0} "
                         f"rows of {files.describe()}")
    return files.paths[i], row - int(ends[i] - files.rows[i])


def locate_error(err: TableError, files: dict[str, TableFiles]) -> ValueError:
    """A :class:`TableError` as a one-line ``ValueError`` naming its table and file.

    With a row: ``items table, file PATH, row R: message`` (R counted within that file);
    without one: ``items table at 'URI' (N file(s)): message``.
    """
    tf = files.get(err.table or "")
    if tf is None:
        return ValueError(str(err))
    if err.row is None or not tf.rows:  # no row, or row counts unknown (not validated)
        return ValueError(f"{tf.describe()}: {err}")
    path, row = locate(tf, err.row)
    return ValueError(f"{tf.name} table, file {path}, row {row}: {err.message}")
