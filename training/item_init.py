"""Start the item id table from the training interactions (``model.item_id_init: svd``).

PureSVD (Cremonesi et al., 2010): the top ``E`` right singular vectors of the binary
training user x item matrix ``X``, each scaled by the square root of its singular value, are
item factors whose dot products follow co-occurrence. Copied into the item tower's id
table (and so into every history tied to it), they give the model the item-item structure
that a closed-form model such as EASE or ALS reads off the data, instead of a random start
that few steps per item must undo: on shopping data each item is a training target only a
handful of times an epoch. The factors are rescaled to the spread of the drawn table
(``model.embedding_init_std``, else the table's own), so the learned positions and the
other inputs keep their share.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pipeline.arrow import column_to_numpy
from pipeline.columns import ITEM_INDEX, USER_KEY
from pipeline.run_dir import RunDir, read_trained
from pipeline.transforms import OOV


def svd_item_factors(users: np.ndarray, items: np.ndarray, num_items: int, dim: int,
                     seed: int = 0) -> np.ndarray:
    """[num_items, dim] PureSVD item factors ``V sqrt(S)`` of the 0/1 user x item matrix.

    Args:
        users: [N] any user key per interaction.
        items: [N] catalogue row per interaction (repeats count once).
        num_items: catalogue size.
        dim: factors kept (columns beyond the matrix's rank are zero).
        seed: seed of the randomised SVD.
    """
    _, user_rows = np.unique(users, return_inverse=True)
    pairs = np.unique(np.stack([user_rows.astype(np.int64), items.astype(np.int64)]), axis=1)
    n_users = int(user_rows.max()) + 1 if len(user_rows) else 1
    x = torch.sparse_coo_tensor(torch.from_numpy(pairs), torch.ones(pairs.shape[1]),
                                (n_users, num_items), check_invariants=True).coalesce()
    rank = min(dim, n_users, num_items)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        _, s, v = torch.svd_lowrank(x, q=rank, niter=4)
    finally:
        torch.random.set_rng_state(state)
    factors = np.zeros((num_items, dim), np.float32)
    factors[:, :rank] = (v * s.sqrt()).numpy()
    return factors


def init_item_ids(table: nn.Embedding, catalogue_ids: np.ndarray, run: RunDir,
                  std: float | None, seed: int = 0, refit: bool = False) -> int:
    """Overwrite the catalogue's rows of ``table`` with rescaled PureSVD item factors.

    Args:
        table: the item tower's id table (vocabulary id -> row).
        catalogue_ids: [I] vocabulary id of each catalogue row (the encoded id column).
        run: the run whose training split (with ``refit``, and validation) is factorised.
        std: target standard deviation of the written rows (None: the table's current).
        seed: seed of the randomised SVD.
        refit: factorise training + validation (what a refit model trains on).

    Returns:
        The number of table rows written: one per vocabulary id of the catalogue, the
        out-of-vocabulary and padding rows left as drawn.
    """
    train = read_trained(run, refit, [USER_KEY, ITEM_INDEX])
    users = column_to_numpy(train[USER_KEY])
    items = column_to_numpy(train[ITEM_INDEX])
    factors = svd_item_factors(users, items, len(catalogue_ids), table.embedding_dim, seed)
    ids = np.asarray(catalogue_ids, np.int64)
    reserved = {table.padding_idx} if table.padding_idx is not None else set()
    reserved.add(OOV)  # shared by every unseen value: keep it drawn
    keep = ~np.isin(ids, list(reserved))
    rows, ids = factors[keep], ids[keep]
    _, first = np.unique(ids, return_index=True)  # one catalogue row per vocabulary id
    rows, ids = rows[first], ids[first]
    with torch.no_grad():
        spread = float(table.weight.std()) if std is None else std
        scale = spread / max(float(rows.std()), 1e-12)
        table.weight[torch.from_numpy(ids)] = torch.from_numpy(rows * scale).to(
            table.weight.dtype)
    return len(ids)
