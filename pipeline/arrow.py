"""Arrow <-> numpy conversions every stage shares (pyarrow and numpy only)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


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
