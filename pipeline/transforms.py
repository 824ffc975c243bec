"""Pure batch transforms: raw columns -> fixed-shape numpy model inputs.

The vectorised primitives the feature kinds (:mod:`pipeline.features`) encode with, each
``(raw column, fitted state) -> np.ndarray``; :func:`pipeline.features.encode_feature`
encodes one feature through its kind's registry entry. The prepare
job (through Ray Data) and the serving endpoint (on request JSON) call the same functions,
so a request is encoded exactly as a training row was.

Index convention for every vocabulary-backed feature: 0 = padding / null, 1 = out of
vocabulary, 2.. = vocabulary entries in the fitted order. Bags (multi-hot, text) are
post-padded ``[v1, v2, 0, 0]``; sequences are pre-padded ``[0, 0, i1, i2]`` so the most
recent item is always the last position.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import TableError
from pipeline.state import FeatureState, NumericTransform

PAD = 0
OOV = 1
_TOKEN_SPLIT = r"[^0-9a-z]+"
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def as_arrow(values: Any) -> pa.Array:
    """Accept a pyarrow array / chunked array, numpy array or Python list.

    A list mixing types Arrow cannot hold in one array (``[7, "x"]``, an integer beyond
    int64) becomes text, where :func:`cast_like` compares it anyway: 7 still finds 7.
    """
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    if isinstance(values, pa.Array):
        return values
    if isinstance(values, np.ndarray) and values.dtype == object:
        values = [v.tolist() if isinstance(v, np.ndarray) else v for v in values]
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        if isinstance(values, np.ndarray) or any(isinstance(v, (list, dict)) for v in values):
            raise
        return pa.array([_as_text(v) for v in values], pa.string())


def _as_text(value: Any) -> str | None:
    """One raw scalar as Arrow's cast to string would write it (booleans: true / false)."""
    if value is None:
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)


def lookup(values: Any, vocab: pa.Array | VocabIndex) -> np.ndarray:
    """Map raw values to vocabulary indices (null -> 0, unseen -> 1, vocab[i] -> i + 2).

    Values are compared by one rule, :func:`cast_like`: cast to the vocabulary's type,
    or, when any value cannot be cast, everything compared as text.

    Args:
        values: [N] raw values.
        vocab: [V] the fitted vocabulary, or its :class:`VocabIndex` (built once: a
            per-call ``pc.index_in`` hashes the whole vocabulary again, ~89 ms at 10^6).

    Returns:
        [N] int64 indices.
    """
    if isinstance(vocab, VocabIndex):
        return vocab.lookup(values)
    arr, as_text = cast_like(as_arrow(values), vocab.type)
    if as_text:
        vocab = pc.cast(vocab, pa.string())
    pos = pc.index_in(arr, value_set=vocab).fill_null(-1).to_numpy(zero_copy_only=False)
    idx = np.where(pos < 0, OOV, pos + 2).astype(np.int64)
    idx[arr.is_null().to_numpy(zero_copy_only=False)] = PAD
    return idx


def cast_like(arr: pa.Array, typ: pa.DataType) -> tuple[pa.Array, bool]:
    """The one rule for comparing raw values with a vocabulary (or a key column) of ``typ``.

    Values are cast to ``typ`` with Arrow's cast ("7" finds the integer 7; " 7", "+7",
    "7.0" and full-width digits do not cast); when any value cannot be cast (e.g. "abc"
    sent for an integer id), the values are compared with the vocabulary as text, where
    such a value is simply unseen.

    Returns:
        ``(values, as_text)``: the values as ``typ``, or as strings with ``as_text`` True
        (the vocabulary must then be compared as strings too).
    """
    if arr.type == typ:
        return arr, False
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), typ), False
    try:
        return pc.cast(arr, typ), False
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return pc.cast(arr, pa.string()), True


def vocab_index(state: FeatureState) -> VocabIndex:
    """A feature's vocabulary lookup table, built once per state object (serving's path)."""
    index = state.__dict__.get("_vocab_index")
    if index is None:
        index = VocabIndex(state.vocab_array())
        object.__setattr__(state, "_vocab_index", index)  # a cache on the frozen state
    return index


class VocabIndex:
    """A vocabulary's value -> index table, built once and reused by every lookup.

    Answers exactly as ``lookup(values, vocab)`` does, through the same :func:`cast_like`
    rule: inputs shorter than ``arrow_from`` (a request) go through a Python dict built on
    first use (one per comparison type); longer ones (a prepare batch) through
    ``pc.index_in``, where one hash of the vocabulary is cheap next to the batch.

    Args:
        vocab: [V] the fitted vocabulary (unique values).
        arrow_from: input length from which the Arrow path is used.
    """

    def __init__(self, vocab: pa.Array | pa.ChunkedArray, arrow_from: int = 4096):
        self.vocab = vocab.combine_chunks() if isinstance(vocab, pa.ChunkedArray) else vocab
        self.arrow_from = arrow_from
        self._tables: dict[bool, dict[Any, int]] = {}  # as_text -> value -> index

    def __len__(self) -> int:
        return len(self.vocab)

    def __reduce__(self) -> tuple:
        return VocabIndex, (self.vocab, self.arrow_from)  # the tables are a cache: not sent

    def _table(self, as_text: bool) -> dict[Any, int]:
        table = self._tables.get(as_text)
        if table is None:  # vocab[i] -> i + 2, as lookup numbers them
            vocab = pc.cast(self.vocab, pa.string()) if as_text else self.vocab
            table = {v: i + 2 for i, v in enumerate(vocab.to_pylist())}
            self._tables[as_text] = table
        return table

    def lookup(self, values: Any) -> np.ndarray:
        """[N] int64 indices of ``values`` (null -> 0, unseen -> 1)."""
        if isinstance(values, list) and len(values) < self.arrow_from and self._native(values):
            get = self._table(False).get  # values of the vocabulary's own type: no cast
            return np.fromiter((get(v, OOV) for v in values), dtype=np.int64,
                               count=len(values))
        arr = as_arrow(values)
        if len(arr) >= self.arrow_from:
            return lookup(arr, self.vocab)
        arr, as_text = cast_like(arr, self.vocab.type)
        get = self._table(as_text).get
        return np.fromiter((PAD if v is None else get(v, OOV) for v in arr.to_pylist()),
                           dtype=np.int64, count=len(arr))

    def lookup_one(self, value: Any) -> int:
        """``lookup([value])[0]`` as an int.

        A value of the vocabulary's own type is one dict lookup, no array (a request's user
        id: 7.5 -> 1 us, measured 2026-12-03).
        """
        if self._native([value]):
            return self._table(False).get(value, OOV)
        return int(self.lookup([value])[0])

    def _native(self, values: list) -> bool:
        """Whether every value already has the vocabulary's Python type (cast: identity)."""
        if pa.types.is_int64(self.vocab.type):
            return all(type(v) is int and -(2**63) <= v < 2**63 for v in values)
        if pa.types.is_string(self.vocab.type):
            return all(type(v) is str for v in values)
        return False


def hash_bucket(values: Any, buckets: int) -> np.ndarray:
    """Stable FNV-1a hash of each value's text into ``2 .. buckets + 1`` (null -> 0)."""
    arr = pc.cast(as_arrow(values), pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(lengths.max(initial=0))):
            live = lengths > j
            h[live] = (h[live] ^ data[offsets[:-1][live] + j].astype(np.uint64)) * _FNV_PRIME
    idx = (h % np.uint64(buckets)).astype(np.int64) + 2
    idx[arr.is_null().to_numpy(zero_copy_only=False)] = PAD
    return idx


def distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values of a 1-d array: ``np.unique`` by a sort.

    NumPy 2.x's ``np.unique`` takes a hash-table path for integers that is far slower on
    large inputs: 112 ms against 3.5 ms here for 244,457 sorted int64 rows (measured on
    this 2-core machine, NumPy 2.4), which made one filtered request at 10^6 items spend
    most of its time deduplicating rows.
    """
    values = np.sort(np.asarray(values).ravel())
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def pad_bags(flat: np.ndarray, offsets: np.ndarray, max_length: int, pre: bool) -> np.ndarray:
    """Lay out ragged rows into a [B, max_length] matrix padded with 0.

    Args:
        flat: [T] values of all rows back to back.
        offsets: [B + 1] row boundaries into ``flat``.
        max_length: columns of the output; longer rows keep their first (``pre=False``)
            or last (``pre=True``) ``max_length`` values.
        pre: pad on the left (sequences: most recent last) instead of the right (bags).

    Returns:
        [B, max_length] int64.
    """
    b = len(offsets) - 1
    lengths = np.diff(offsets)
    kept = np.minimum(lengths, max_length)
    out = np.zeros((b, max_length), dtype=np.int64)
    rows = np.repeat(np.arange(b), kept)
    within = np.arange(kept.sum()) - np.repeat(np.cumsum(kept) - kept, kept)
    start = offsets[:-1] + (lengths - kept if pre else 0)
    src = np.repeat(start, kept) + within
    col = within + (np.repeat(max_length - kept, kept) if pre else 0)
    out[rows, col] = flat[src]
    return out


def _list_parts(values: Any) -> tuple[pa.Array, np.ndarray]:
    arr = as_arrow(values)
    if pa.types.is_fixed_size_list(arr.type):
        arr = pc.cast(arr, pa.list_(arr.type.value_type))
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise ValueError(f"expected a list column, got {arr.type}")
    arr = arr.fill_null(pa.scalar([], arr.type)) if arr.null_count else arr
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return arr.values.slice(offsets[0], offsets[-1] - offsets[0]), offsets - offsets[0]


def tokenize(values: Any) -> pa.Array:
    """Lower-case and split text on non-alphanumerics: [N] strings -> [N] token lists."""
    arr = pc.utf8_lower(pc.cast(as_arrow(values), pa.string()).fill_null(""))
    parts = pc.split_pattern_regex(arr, _TOKEN_SPLIT)
    flat = pc.list_flatten(parts)
    parent = pc.list_parent_indices(parts).to_numpy()
    keep = pc.not_equal(flat, "").to_numpy(zero_copy_only=False)
    counts = np.bincount(parent[keep], minlength=len(arr))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), flat.filter(pa.array(keep)))


def encode_bag(values: Any, state: FeatureState) -> np.ndarray:
    """Multi-hot list column -> [B, max_length] vocabulary ids (post-padded)."""
    flat, offsets = _list_parts(values)
    return pad_bags(lookup(flat, vocab_index(state)), offsets, state.max_length, pre=False)


def encode_text(values: Any, state: FeatureState) -> np.ndarray:
    """Text column -> [B, max_length] token ids (post-padded)."""
    return encode_bag(tokenize(values), state)


def encode_numeric(values: Any, state: FeatureState) -> tuple[np.ndarray, np.ndarray]:
    """Numeric column -> ([B] float32 value or int64 bucket, [B] float32 null flag)."""
    arr = pc.cast(as_arrow(values), pa.float64())
    missing = arr.is_null().to_numpy(zero_copy_only=False)
    x = arr.fill_null(state.fill_value).to_numpy(zero_copy_only=False).astype(np.float64)
    missing |= ~np.isfinite(x)
    x = np.where(np.isfinite(x), x, state.fill_value)
    if state.transform is NumericTransform.BUCKETIZE:
        buckets = np.searchsorted(np.asarray(state.boundaries), x, side="right") + 1
        return buckets.astype(np.int64), missing.astype(np.float32)
    if state.transform is NumericTransform.LOG:
        x = np.log1p(np.maximum(x, 0.0))
    if state.transform in (NumericTransform.STANDARDIZE, NumericTransform.LOG):
        x = (x - state.mean) / state.std
    return x.astype(np.float32), missing.astype(np.float32)


def encode_dense(values: Any, state: FeatureState, name: str) -> np.ndarray:
    """Fixed-length vector column -> [B, dim] float32 (null rows -> zeros).

    Raises:
        TableError: at the first row of another length (a ``ValueError``).
    """
    arr = as_arrow(values)
    flat, offsets = _list_parts(arr)
    lengths = np.diff(offsets)
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    bad = np.flatnonzero((lengths != state.dim) & ~nulls)
    if len(bad):
        raise TableError(
            f"column {state.source!r} (dense_vector {name!r}) has {len(bad)} row(s) of the "
            f"wrong length, this one {int(lengths[bad[0]])} values; accepted: a list of "
            f"exactly dim={state.dim} numbers, or null", row=int(bad[0]))
    out = np.zeros((len(arr), state.dim), dtype=np.float32)
    vals = pc.cast(flat, pa.float32()).fill_null(0.0).to_numpy(zero_copy_only=False)
    out[~nulls] = vals.reshape(-1, state.dim)
    return out


def encode_sequence(histories: Any, item_vocab: pa.Array | VocabIndex,
                    max_length: int) -> np.ndarray:
    """Raw item-id histories (oldest first) -> [B, max_length] ids, pre-padded."""
    flat, offsets = _list_parts(histories)
    return pad_bags(lookup(flat, item_vocab), offsets, max_length, pre=True)


