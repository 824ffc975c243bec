"""EASE and ALS of benchmarks/baselines.py: sparse histories, EASE checked against its formula."""

import numpy as np
import torch

from benchmarks.baselines import als, ease, history_matrix, score
from indexing.eval_set import EvalSet
from indexing.metrics import retrieval_metrics


def _eval_set(seed=0, users=60, items=25) -> EvalSet:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 8, users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    history = rng.integers(0, items, offsets[-1])
    history[1] = history[0]  # user 0 lists an item twice
    return EvalSet(user_inputs={}, targets=rng.integers(0, items, users),
                   history_offsets=offsets, history_items=history)


def test_history_matrix_is_sparse_and_counts_a_repeat_once():
    es = _eval_set()
    x = history_matrix(es, 25)
    assert x.shape == (60, 25) and x.dtype == np.float32
    assert set(np.unique(x.data)) == {1.0}
    assert x[0].nnz == len(set(es.history_items[: es.history_offsets[1]]))


def test_ease_matches_the_closed_form():
    es = _eval_set()
    x = history_matrix(es, 25)
    dense = x.toarray().astype(np.float64)
    scores = ease(x, {"lambda": 10.0})(slice(0, 60)).numpy()
    np.testing.assert_allclose(scores, dense @ _ease_b(dense, 10.0), atol=1e-4)


def test_chunked_scores_give_the_embedding_path_figures():
    # EASE as embeddings (users x, items B^T) through retrieval_metrics, against its sparse
    # scorer in chunks of 7 users: the same figures, masked and unmasked
    es = _eval_set(1)
    x = history_matrix(es, 25)
    dense = x.toarray()
    figures = score(ease, {"lambda": 5.0}, es, 25, chunk=7)
    reference = retrieval_metrics(torch.from_numpy(dense),
                                  torch.from_numpy(_ease_b(dense, 5.0).T.astype(np.float32)),
                                  es.targets, es.history_offsets, es.history_items)
    for kind in ("masked", "unmasked"):
        for k, v in reference[kind].items():
            assert abs(figures[kind][k] - v) < 1e-6, (kind, k)
    assert 0 < figures["unmasked"]["HR@100"] <= 1
    assert als(x, {"factors": 4, "regularization": 0.1, "alpha": 1.0})(slice(3, 10)).shape \
        == (7, 25)


def _ease_b(dense: np.ndarray, lam: float) -> np.ndarray:
    p = np.linalg.inv(dense.T.astype(np.float64) @ dense + lam * np.eye(dense.shape[1]))
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices_from(b)] = 0.0
    return b
