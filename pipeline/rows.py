"""Pure row encoders shared by prepare and serving (numpy and pyarrow, no Ray).

A table's features encoded as prepared columns (:func:`encode_table`), the row of a key
absent from its table (:func:`absent_row`), a user's id features (:func:`id_columns`) and
history columns laid out from catalogue rows (:func:`history_columns`). Prepare builds its
rows with them (``prepare/rows.py``), and serving encodes a request with the same
functions (``serve_app/encode.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pyarrow as pa

from pipeline.columns import USER, column_name, prefixed
from pipeline.config import checks
from pipeline.features import encode_feature, spec_of, transform_tower
from pipeline.state import TowerState

Columns = dict[str, np.ndarray]  # column or input key -> [N, ...]


def encode_table(table: pa.Table, tower: TowerState, skip: Sequence[str] = ()) -> Columns:
    """Encode every table-backed feature of a tower: ``{name: [N, ...]}`` (no prefix)."""
    return transform_tower({c: table[c] for c in table.column_names}, tower, skip=skip)


def absent_row(tower: TowerState, skip: Sequence[str] = ()) -> Columns:
    """The encoded row of a key absent from its table: every feature null, ``[1, ...]``.

    Prepare appends it to the encoded user table (users seen only in interactions), and
    serving starts an unknown user from it: one function, two callers.
    """
    out: Columns = {}
    for name, st in tower.features.items():
        if spec_of(st.type).table_column and name not in skip:
            out.update(encode_feature(spec_of(st.type).null_array(st), st, name))
    return out


def id_feature_names(tower: TowerState, key: str) -> list[str]:
    """The tower's id features: categorical features read from its key column."""
    return checks.id_features(((n, s.type, s.source) for n, s in tower.features.items()), key)


def id_columns(tower: TowerState, key: str, ids: pa.Array) -> Columns:
    """The id features of ``ids`` [N] raw keys, as prepared columns (``user__NAME``)."""
    out: Columns = {}
    for name in id_feature_names(tower, key):
        out.update(prefixed(USER, encode_feature(ids, tower.features[name], name)))
    return out


def history_columns(tower: TowerState, ids: Mapping[str, np.ndarray],
                    rows: Mapping[str, np.ndarray], item_feats: Mapping[str, np.ndarray]
                    ) -> Columns:
    """Every history column of a user tower from laid-out histories.

    Args:
        tower: the user tower's fitted state.
        ids: sequence name -> [B, L] history vocabulary ids (0 = padding), for each sequence
            to lay out (every sequence of the tower, or the one training windows are cut
            from).
        rows: sequence name -> [B, L] catalogue row of each position (-1 = padding or an
            unknown item).
        item_feats: item feature name -> [I] its encoded catalogue column.

    Returns:
        ``user__SEQ`` and ``user__SEQ__FEATURE`` -> [B, L] int64 (0 where ``rows`` is -1).
    """
    out: Columns = {}
    for name in ids:
        st = tower.features[name]
        at = rows[name]
        out[column_name(USER, name)] = ids[name]
        for f in st.item_features:
            out[column_name(USER, name, f)] = np.where(at >= 0, item_feats[f][np.maximum(at, 0)],
                                                       0)
    return out
