"""Attribute filters at retrieval time: value -> catalogue rows, built once per run.

For every filterable item feature (categorical or multi-hot with a vocabulary, see
:func:`serve_app.contract.filterable`) :class:`AttributeIndex` holds the catalogue rows of
each vocabulary entry in CSR form, read from the encoded catalogue
(``prepared/items.parquet``, row number = index id): ``offsets`` [V + 1] into ``rows`` [T]
(T = items for a categorical, item-value pairs for a multi-hot), rows ascending within each
value. A request's filter ``{attribute: [values]}`` becomes the sorted rows that have any
of the values for every attribute (OR within, AND across), which the index search takes as
its allow-list: the answer is the top k among exactly those items.

Raw filter values are looked up in the feature's vocabulary by the same rule as every
other lookup (``pipeline.transforms.VocabIndex``). A value outside the vocabulary matches
nothing: values that ``min_count`` / ``max_vocab`` folded into the out-of-vocabulary row
cannot be told apart in the encoded catalogue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.arrow import column_to_numpy
from pipeline.columns import ITEM, column_name
from pipeline.features import InputForm, spec_of
from pipeline.state import RESERVED, FeatureState
from pipeline.transforms import PAD, distinct, vocab_index


@dataclass(frozen=True)
class Postings:
    """The rows of each vocabulary entry of one attribute (CSR)."""

    state: FeatureState
    offsets: np.ndarray  # [V + 1] int64, V = the feature's num_embeddings
    rows: np.ndarray  # [T] int64 catalogue rows, ascending within each value

    def rows_of(self, values: list[Any]) -> np.ndarray:
        """Sorted unique rows having any of ``values`` (raw; out of vocabulary: none)."""
        index = distinct(vocab_index(self.state).lookup(values))
        index = index[index >= RESERVED]  # padding and out-of-vocabulary match nothing
        parts = [self.rows[self.offsets[i]:self.offsets[i + 1]] for i in index]
        if not parts:
            return np.zeros(0, np.int64)
        if len(parts) == 1:
            return parts[0]
        merged = np.concatenate(parts)
        # categorical values partition the rows: a sort suffices; multi-hot ones overlap
        return np.sort(merged) if spec_of(self.state.type).form is InputForm.ID \
            else distinct(merged)


def postings(values: np.ndarray, num_values: int, state: FeatureState) -> Postings:
    """CSR of an encoded column: [I] (categorical) or [I, L] (multi-hot) value ids."""
    values = np.asarray(values, dtype=np.int64)
    if values.ndim == 1:
        item_rows, ids = np.arange(len(values), dtype=np.int64), values
    else:
        item_rows = np.repeat(np.arange(len(values), dtype=np.int64), values.shape[1])
        ids = values.ravel()
        keep = ids != PAD
        pairs = distinct(ids[keep] * len(values) + item_rows[keep])  # dedupe (value, row)
        ids, item_rows = pairs // len(values), pairs % len(values)
    order = np.argsort(ids, kind="stable")  # by value; rows stay ascending within one
    counts = np.bincount(ids, minlength=num_values)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Postings(state, offsets, item_rows[order])


class AttributeIndex:
    """Per-attribute postings of one run's catalogue, and the filter -> rows step.

    Args:
        catalogue: ``prepared/items.parquet`` (encoded item features, row = index id).
        attributes: filterable feature name -> its fitted state.
    """

    def __init__(self, catalogue: pa.Table, attributes: dict[str, FeatureState]):
        start = time.perf_counter()
        self.count = catalogue.num_rows
        self.attributes = {
            name: postings(column_to_numpy(catalogue[column_name(ITEM, name)]),
                           st.num_embeddings, st)
            for name, st in attributes.items()}
        self.build_seconds = time.perf_counter() - start
        self.nbytes = sum(p.offsets.nbytes + p.rows.nbytes for p in self.attributes.values())

    def rows(self, filter_: dict[str, list[Any]] | None, allow: np.ndarray | None
             ) -> np.ndarray | None:
        """Sorted rows passing every filter attribute and ``allow`` (None: no restriction).

        Args:
            filter_: attribute -> raw values (attributes already checked by the contract).
            allow: sorted unique catalogue rows of ``allow_items``, or None.
        """
        out = allow
        for name, values in (filter_ or {}).items():
            rows = self.attributes[name].rows_of(values)
            out = rows if out is None else np.intersect1d(out, rows, assume_unique=True)
        return out
