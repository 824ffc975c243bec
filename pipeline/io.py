"""Table locations and schema validation (pyarrow only; no Ray here).

A table path may be a file, a folder of Parquet files or a glob, on any filesystem
pyarrow understands (local, s3://, gs://, ...). Validation reads only the Parquet
footers, file by file, so an error names the file and the column before any work starts.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import config as C
from pipeline.features import FeatureKind, spec_of
from pipeline.features.base import is_list_of, is_scalar_key

_GLOB = set("*?[")


@dataclass(frozen=True)
class TableFiles:
    """The resolved Parquet files of one table and the filesystem they live on."""

    name: str
    uri: str
    filesystem: pafs.FileSystem
    paths: list[str]


def resolve_files(name: str, uri: str) -> TableFiles:
    """List the Parquet files behind a file / folder / glob path, sorted by path.

    Raises:
        FileNotFoundError: naming the table and the path when nothing matches.
    """
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(uri)
    if _GLOB & set(path):
        base = path[: min(path.index(c) for c in _GLOB if c in path)].rsplit("/", 1)[0]
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        paths = [i.path for i in infos if i.is_file and fnmatch.fnmatch(i.path, path)]
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            paths = [path]
        elif info.type == pafs.FileType.Directory:
            infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            paths = [i.path for i in infos if i.is_file and _is_data_file(i.path)]
        else:
            paths = []
    if not paths:
        raise FileNotFoundError(f"{name} table: no Parquet files at {uri!r}")
    return TableFiles(name, uri, fs, sorted(paths))


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
        inter[d.weight] = FeatureKind.NUMERIC.value  # checked as a numeric feature column
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


def validate_table(files: TableFiles, columns: dict[str, str]) -> pa.Schema:
    """Check every file's footer for the needed columns and types.

    Raises:
        ValueError: naming the file, the column, the type found and the types accepted.
    """
    schema = None
    for path in files.paths:
        schema = pq.read_schema(path, filesystem=files.filesystem)
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
    return schema


def to_arrow_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """Numpy columns -> a plain Arrow table; [N, L] arrays become fixed_size_list<L>."""
    out = {}
    for name, arr in columns.items():
        if isinstance(arr, np.ndarray) and arr.ndim == 2:
            flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
            out[name] = pa.FixedSizeListArray.from_arrays(flat, arr.shape[1])
        else:
            out[name] = pa.array(arr)
    return pa.table(out)


def column_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """An Arrow column as numpy; fixed-size lists become ``[N, L]`` arrays."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_fixed_size_list(arr.type):
        width = arr.type.list_size
        flat = arr.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(arr), width)
    return arr.to_numpy(zero_copy_only=False)


def table_to_numpy(table: pa.Table, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    """Selected columns of a table as numpy arrays."""
    return {c: column_to_numpy(table[c]) for c in (columns or table.column_names)}
