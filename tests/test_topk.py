"""Top-k: exact vs a numpy oracle (ties, exclusion), FAISS vs exact, save -> load identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from indexing.topk.exact import ExactTopK
from indexing.topk.faiss_index import FaissTopK
from indexing.topk.store import build_topk, default_factory, load_topk


def _oracle(items, ids, queries, k, exclude=None):
    """np.argsort with stable ties (lower row first) on exact int64 scores."""
    s = queries.astype(np.int64) @ items.astype(np.int64).T  # [Q, N], exact integers
    out_ids = np.full((len(queries), k), -1, dtype=np.int64)
    out_scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for i in range(len(queries)):
        order = np.argsort(-s[i], kind="stable")
        if exclude is not None:
            order = order[~np.isin(ids[order], exclude[i])]
        order = order[:k]
        out_ids[i, : len(order)], out_scores[i, : len(order)] = ids[order], s[i, order]
    return out_scores, out_ids


def _integer_data(seed, n=300, d=4, q=40):
    """Entries in {-2..2}: float32 dot products are exact, so ties are real ties."""
    rng = np.random.default_rng(seed)
    items = rng.integers(-2, 3, (n, d)).astype(np.float32)
    queries = rng.integers(-2, 3, (q, d)).astype(np.float32)
    ids = rng.choice(10**6, n, replace=False).astype(np.int64)
    return items, ids, queries


def _clustered(seed, n, d, centers=50, spread=0.3):
    """Gaussian clusters: ANN indexes work on structured data, not isotropic noise."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(centers, d))
    return (mu[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d))).astype(np.float32)


def test_exact_hand_worked_ties_padding_and_exclusion():
    # items [1,0], [0,1], [1,1] (ids 10, 20, 30); query [1, 0] -> dot scores [1, 0, 1]
    # tie 10 / 30 -> lower row first: [10, 30, 20]; k = 5 pads with -1 / -inf
    items = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    topk = ExactTopK(items, np.array([10, 20, 30]), "dot")
    scores, ids = topk.search(np.array([[1.0, 0.0]], dtype=np.float32), 5)
    assert ids.tolist() == [[10, 30, 20, -1, -1]]
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    assert scores[0, :3].tolist() == [1, 1, 0] and np.isneginf(scores[0, 3:]).all()
    scores, ids = topk.search(torch.tensor([[1.0, 0.0]]), 2, exclude=[np.array([10])])
    assert ids.tolist() == [[30, 20]] and scores.tolist() == [[1, 0]]
    # cosine: rows become [1,0], [0,1], [0.7071, 0.7071]; query [2,0] -> [1, 0, 0.7071]
    cos = ExactTopK(items, np.array([10, 20, 30]), "cosine")
    scores, ids = cos.search(np.array([[2.0, 0.0]], dtype=np.float32), 3)
    assert ids.tolist() == [[10, 30, 20]]
    assert np.allclose(scores, [[1.0, 2**-0.5, 0.0]])


@pytest.mark.parametrize("factory", ["Flat", "HNSW32"])
def test_faiss_pads_when_k_exceeds_catalogue(factory):
    # same catalogue as the hand-worked test: dot scores [1, 0, 1] -> ids [10, 30, 20]
    items = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    scores, ids = build_topk(items, np.array([10, 20, 30]), "dot", factory).search(
        np.array([[1.0, 0.0]], dtype=np.float32), 5, exclude=[np.array([20])])
    assert ids.tolist() == [[10, 30, -1, -1, -1]] or ids.tolist() == [[30, 10, -1, -1, -1]]
    assert scores[0, :2].tolist() == [1, 1] and np.isneginf(scores[0, 2:]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("factory", ["exact", "Flat"])  # Flat: one product, masked per query
def test_exact_equals_numpy_oracle_with_ties_and_exclusion(seed, factory):
    items, ids, queries = _integer_data(seed)
    topk = build_topk(items, ids, "dot", factory)
    for k in (1, 10, 300, 310):
        assert all(np.array_equal(a, b) for a, b in
                   zip(topk.search(queries, k), _oracle(items, ids, queries, k), strict=True))
    rng = np.random.default_rng(seed + 100)
    exclude = [rng.choice(ids, rng.integers(0, 20), replace=False) for _ in queries]
    got = topk.search(queries, 10, exclude=exclude)
    want = _oracle(items, ids, queries, 10, exclude)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    assert not any(np.isin(got[1][i], exclude[i]).any() for i in range(len(queries)))
    for i in range(len(queries)):  # one query at a time, as a served request
        alone = topk.search(queries[i:i + 1], 10, exclude=exclude[i:i + 1])
        assert np.array_equal(alone[1], want[1][i:i + 1]), i
        assert np.array_equal(alone[0], want[0][i:i + 1]), i


@pytest.mark.parametrize("batch", [1, 7])
def test_flat_gives_identical_rows_one_score_in_row_order(batch):
    """Copies of one real-valued vector anywhere in the catalogue tie exactly, lower row first."""
    rng = np.random.default_rng(5)
    items = rng.normal(size=(2003, 64)).astype(np.float32)
    queries = rng.normal(size=(batch, 64)).astype(np.float32)
    best = items[np.argmax(queries[0] @ items.T)] * 2  # above every row for the first query
    copies = np.array([1998, 5, 2002, 640, 1001])  # block heads, middles and the tail
    items[copies] = best
    ids = np.arange(2003, dtype=np.int64) + 10
    scores, got = build_topk(items, ids, "dot", "Flat").search(
        queries, 8, exclude=[np.array([640 + 10])] + [None] * (batch - 1))
    assert got[0, :4].tolist() == [5 + 10, 1001 + 10, 1998 + 10, 2002 + 10]  # 640 excluded
    assert len(set(scores[0, :4].tolist())) == 1 and scores[0, 4] < scores[0, 3]


@pytest.mark.parametrize("similarity", ["dot", "cosine"])
def test_flat_equals_exact_on_random_data(similarity):
    rng = np.random.default_rng(3)
    items = rng.normal(size=(2000, 16)).astype(np.float32)
    queries = rng.normal(size=(50, 16)).astype(np.float32)
    ids = np.arange(2000, dtype=np.int64) * 7 + 3
    exact = ExactTopK(items, ids, similarity)
    flat = FaissTopK(items, ids, similarity, "Flat")
    exclude = [ids[rng.integers(0, 2000, 5)] for _ in queries]
    for ex in (None, exclude):
        (es, ei), (fs, fi) = exact.search(queries, 10, ex), flat.search(queries, 10, ex)
        assert np.array_equal(ei, fi) and np.allclose(es, fs, atol=1e-5)


def test_cosine_normalises_items_and_queries():
    # scaling any item or query by a positive factor changes neither ids nor cosine scores
    rng = np.random.default_rng(4)
    items = rng.normal(size=(500, 8)).astype(np.float32)
    queries = rng.normal(size=(20, 8)).astype(np.float32)
    ids = np.arange(500)
    scale = rng.uniform(0.01, 100, (500, 1)).astype(np.float32)
    for factory in ("exact", "Flat"):
        base = build_topk(items, ids, "cosine", factory).search(queries, 10)
        scaled = build_topk(items * scale, ids, "cosine", factory).search(queries * 9, 10)
        assert np.array_equal(base[1], scaled[1]) and np.allclose(base[0], scaled[0], atol=1e-5)
        assert base[0].max() <= 1 + 1e-6
    # dot does not normalise: the scaled catalogue ranks differently
    assert not np.array_equal(build_topk(items, ids, "dot", "Flat").search(queries, 10)[1],
                              build_topk(items * scale, ids, "dot", "Flat").search(queries, 10)[1])


@pytest.fixture(scope="module")
def clustered():
    items = _clustered(5, 20_000, 32)
    queries = _clustered(5, 200, 32)  # same seed -> same centres and clusters, fresh noise
    ids = np.arange(20_000, dtype=np.int64) + 1_000
    exact_ids = ExactTopK(items, ids, "dot").search(queries, 10)[1]
    return items, ids, queries, exact_ids


@pytest.mark.parametrize("factory,params", [("HNSW32", {"efSearch": 64}),
                                            ("IVF64,Flat", {"nprobe": 8})])
def test_ann_recall_at_10_against_exact(clustered, factory, params):
    items, ids, queries, exact_ids = clustered
    got = FaissTopK(items, ids, "dot", factory, params).search(queries, 10)[1]
    recall = np.mean([len(np.intersect1d(g, e)) / 10 for g, e in zip(got, exact_ids, strict=True)])
    assert recall >= 0.9, f"{factory} recall@10 = {recall:.3f}"


@pytest.mark.parametrize("factory,params", [("exact", None), ("Flat", None),
                                            ("HNSW32", {"efSearch": 40}),
                                            ("IVF16,PQ4x4", {"nprobe": 4})])
def test_save_load_gives_identical_results(tmp_path, factory, params):
    items = _clustered(6, 2000, 16)
    queries = _clustered(7, 30, 16)
    ids = np.arange(2000, dtype=np.int64)[::-1].copy()
    topk = build_topk(items, ids, "cosine", factory, params)
    meta = topk.save(tmp_path)
    loaded = load_topk(tmp_path, meta)
    exclude = [ids[:3]] * len(queries)
    for ex in (None, exclude):
        (a_s, a_i), (b_s, b_i) = topk.search(queries, 15, ex), loaded.search(queries, 15, ex)
        assert np.array_equal(a_i, b_i) and np.array_equal(a_s, b_s)
    assert meta.model_dump(mode="json") == {
        "kind": "exact" if factory == "exact" else "faiss", "factory": factory,
        "similarity": "cosine", "dim": 16, "count": 2000, "params": params or {}}
    assert np.array_equal(np.load(tmp_path / "ids.npy", allow_pickle=False), ids)


def test_default_factory_by_catalogue_size():
    # 4e6 items: nlist = 4 * sqrt(4e6) = 8000 <= 4e6 / 39 = 102564
    assert default_factory(1_682, 64) == "Flat"
    assert default_factory(50_000, 64) == "HNSW32"
    assert default_factory(1_000_000, 64) == "HNSW32"
    assert default_factory(4_000_000, 64) == "IVF8000,Flat"
    items = np.eye(4, dtype=np.float32)
    assert isinstance(build_topk(items, np.arange(4), "dot"), FaissTopK)
    assert isinstance(build_topk(items, np.arange(4), "dot", "exact"), ExactTopK)


def test_errors_name_the_value():
    items = np.random.default_rng(0).normal(size=(30, 8)).astype(np.float32)
    ids = np.arange(30)
    with pytest.raises(ValueError, match="factory 'IVFbogus' is not a faiss"):
        build_topk(items, ids, "dot", "IVFbogus")
    with pytest.raises(ValueError, match=r"needs at least 64 vectors to train; got 30.*at most 1"):
        build_topk(items, ids, "dot", "IVF64,Flat")
    with pytest.raises(ValueError, match="'IVF1,PQ8' needs at least 256 vectors"):
        build_topk(items, ids, "dot", "IVF1,PQ8")  # 2^8 codewords per PQ sub-quantizer
    with pytest.raises(ValueError, match="nprobe=4 does not apply to factory 'HNSW32'"):
        build_topk(items, ids, "dot", "HNSW32", {"nprobe": 4})
    with pytest.raises(ValueError, match="1 duplicate"):
        build_topk(items, np.r_[np.arange(29), 0], "dot", "exact")
    with pytest.raises(ValueError, match="'euclid' is not a valid Similarity"):
        build_topk(items, ids, "euclid", "exact")
    topk = build_topk(items, ids, "dot", "Flat")
    with pytest.raises(ValueError, match="queries have dim 4; the index holds dim 8"):
        topk.search(items[:, :4], 3)
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        topk.search(items[:2], 3, exclude=[ids[:1]])


# -- per-query exclusions and allow-lists ------------------------------------------------

def _filtered_oracle(items, ids, queries, k, exclude, allow):
    """Brute force in float64: per query, the k best of allow (or all) minus exclude."""
    s = queries.astype(np.float64) @ items.astype(np.float64).T
    out = []
    for i in range(len(queries)):
        ok = np.ones(len(ids), bool) if allow[i] is None else np.isin(ids, allow[i])
        ok &= ~np.isin(ids, exclude[i])
        rows = np.flatnonzero(ok)
        out.append(ids[rows[np.argsort(-s[i, rows], kind="stable")[:k]]].tolist())
    return out


@pytest.fixture(scope="module")
def filtered_case():
    rng = np.random.default_rng(11)
    items = _clustered(11, 20_000, 16, spread=1.0)  # overlapping clusters: HNSW's recall
    queries = _clustered(12, 12, 16, spread=1.0)  # is high on them, as on real embeddings
    ids = np.arange(20_000, dtype=np.int64) * 3 + 5
    exclude = [rng.choice(ids, n, replace=False) for n in (0, 3, 40, 300, 5000, 0) * 2]
    allow = [None] * 6 + [rng.choice(ids, n, replace=False) for n in (5, 50, 2000, 9000)] + [
        ids[:12_000], np.r_[ids[:4], 10**9]]  # a large allow-list; one with an unknown id
    return items, ids, queries, exclude, allow


@pytest.mark.parametrize("factory", ["exact", "Flat"])
def test_exclusions_and_allow_lists_equal_the_exact_filtered_top_k(filtered_case, factory):
    items, ids, queries, exclude, allow = filtered_case
    topk = build_topk(items, ids, "dot", factory)
    scores, got = topk.search(queries, 10, exclude=exclude, allow=allow)
    want = _filtered_oracle(items, ids, queries, 10, exclude, allow)
    for i in range(len(queries)):
        assert got[i][got[i] >= 0].tolist() == want[i], i
        allowed = ids if allow[i] is None else allow[i]
        assert np.isin(got[i][got[i] >= 0], allowed).all()
        assert not np.isin(got[i], exclude[i]).any()
    # 4 allowed ids (10**9 is not indexed): 4 answers, then padding
    assert (got[-1] >= 0).sum() == 4 and np.isneginf(scores[-1, 4:]).all()
    assert (got[:-1] >= 0).sum(1).tolist() == [10] * 6 + [5] + [10] * 4


@pytest.mark.parametrize("factory,params", [("HNSW32", {"efSearch": 64}),
                                            ("IVF64,Flat", {"nprobe": 16})])
def test_ann_filters_return_only_matching_items_and_never_fewer_than_k(filtered_case, factory,
                                                                        params):
    items, ids, queries, exclude, allow = filtered_case
    topk = FaissTopK(items, ids, "dot", factory, params)
    _, got = topk.search(queries, 50, exclude=exclude, allow=allow)
    want = _filtered_oracle(items, ids, queries, 50, exclude, allow)
    recalls = []
    for i in range(len(queries)):
        allowed = ids if allow[i] is None else allow[i]
        found = got[i][got[i] >= 0]
        assert np.isin(found, allowed).all() and not np.isin(found, exclude[i]).any()
        assert len(found) == len(want[i]) == min(50, len(set(allowed) & set(ids.tolist())))
        recalls.append(len(set(found.tolist()) & set(want[i])) / len(want[i]))
    assert np.mean(recalls) >= 0.85, recalls


def test_a_graph_search_that_runs_dry_falls_back_to_the_exact_answer(filtered_case,
                                                                      monkeypatch):
    import indexing.topk.faiss_index as topk_module

    items, ids, queries, _, _ = filtered_case
    monkeypatch.setattr(topk_module, "BRUTE_FORCE_MAX", 0)  # every allow-list via the graph
    monkeypatch.setattr(topk_module, "BRUTE_FORCE_FRACTION", 0.0)
    topk = FaissTopK(items, ids, "dot", "HNSW32", {"efSearch": 16})
    allow = [ids[[3, 9_000, 12_345, 19_999, 77]]] * 2  # 5 of 20,000: the graph finds few
    _, got = topk.search(queries[:2], 10, exclude=[ids[[77]], None], allow=allow)
    want = _filtered_oracle(items, ids, queries[:2], 10, [ids[[77]], []], allow)
    assert [g[g >= 0].tolist() for g in got] == want and [len(w) for w in want] == [4, 5]


def test_a_long_exclusion_list_does_not_change_its_neighbours(filtered_case):
    items, ids, queries, _, _ = filtered_case
    topk = build_topk(items, ids, "dot", "Flat")
    alone = topk.search(queries[:2], 10, exclude=[ids[:3], ids[3:5]])
    long = ids[np.random.default_rng(0).choice(20_000, 10_000, replace=False)]
    together = topk.search(queries[:3], 10, exclude=[ids[:3], ids[3:5], long])
    assert np.array_equal(together[1][:2], alone[1]) and np.array_equal(together[0][:2], alone[0])
    assert not np.isin(together[1][2], long).any() and (together[1][2] >= 0).all()


def test_masked_top_keeps_order_and_pads():
    from indexing.topk.kernels import _masked_top

    # row 0 drops 7 and 3 -> [5, 1, -1]; row 1 drops nothing -> cut to 3; -1 never kept
    scores = np.array([[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]], np.float32)
    rows = np.array([[7, 5, 3, 1, -1], [0, 2, 4, 6, 8]])
    s, r = _masked_top(scores, rows, np.array([0, 0]), np.array([7, 3]), 3, 9)
    assert r.tolist() == [[5, 1, -1], [0, 2, 4]]
    assert s[0, :2].tolist() == [8, 6] and np.isneginf(s[0, 2]) and s[1].tolist() == [4, 3, 2]


def test_flat_scored_in_numpy_equals_faiss_flat_search(filtered_case, monkeypatch):
    """Flat indexes up to DENSE_MAX_ITEMS are scored and masked in numpy, every exclusion
    list in one search: same answers as faiss's own Flat search widened and masked, with
    the lists above WIDEN_MAX searched alone (the path of larger Flat indexes)."""
    import indexing.topk.faiss_index as topk_module

    items, ids, queries, exclude, _ = filtered_case
    short = [e[:60] for e in exclude]  # every list short enough to be searched together
    dense_max = topk_module.DENSE_MAX_ITEMS
    for lists in (short, exclude):  # exclude: 300 and 5,000 ids, above WIDEN_MAX
        monkeypatch.setattr(topk_module, "DENSE_MAX_ITEMS", dense_max)
        dense = build_topk(items, ids, "cosine", "Flat")
        dense._search_alone = None  # the numpy path searches every query together
        got = dense.search(queries, 25, exclude=lists)
        assert dense._dense is not False  # the numpy path ran
        monkeypatch.setattr(topk_module, "DENSE_MAX_ITEMS", 0)
        searched = build_topk(items, ids, "cosine", "Flat")
        want = searched.search(queries, 25, exclude=lists)
        assert searched._dense is False
        assert np.array_equal(got[1], want[1]) and np.allclose(got[0], want[0], atol=1e-6)
        assert not any(np.isin(got[1][i], lists[i]).any() for i in range(len(queries)))
    # k beyond the catalogue: every row but the excluded, then padding, on both paths
    few = build_topk(items[:30], ids[:30], "dot", "Flat")
    s, r = few.search(queries[:2], 40, exclude=[ids[:5], None])
    assert (r[0] >= 0).sum() == 25 and (r[1] >= 0).sum() == 30
    assert np.isneginf(s[0, 25:]).all() and (r[0, 25:] == -1).all()


def _crowded_case():
    """Item vectors in a narrow cone, queries nearly orthogonal to it (a barely trained
    model's regime): ANN indexes need far more search effort here than on spread data."""
    rng = np.random.default_rng(5)
    items = rng.normal(size=(20_000, 16)).astype(np.float32)
    items[:, 0] += 8.0
    queries = rng.normal(size=(200, 16)).astype(np.float32)
    queries[:, 0] = 0.0
    ids = np.arange(20_000, dtype=np.int64)
    want = build_topk(items, ids, "cosine", "exact").search(queries, 50)[1]
    return items, ids, queries, want


def test_reach_recall_raises_ef_search_until_the_target_and_saves_it(tmp_path):
    from indexing.build import overlap, reach_recall

    items, ids, queries, want = _crowded_case()
    index = build_topk(items, ids, "cosine", "HNSW32", {"efSearch": 16})
    before = overlap(index.search(queries, 50)[1], want)
    logs: list[str] = []
    recall = reach_recall(index, queries, want, 0.9, logs.append)
    ef = index.params["efSearch"]
    assert before < 0.85 and recall >= 0.9 and 16 < ef <= 1024 and ef & (ef - 1) == 0
    assert "below index.target_recall 0.9" in logs[0] and len(logs) == 1 + np.log2(ef / 16)
    assert recall == overlap(index.search(queries, 50)[1], want)  # the setting searched
    loaded = load_topk(tmp_path / "ix", index.save(tmp_path / "ix"))
    assert loaded.params == {"efSearch": ef} and loaded.index.hnsw.efSearch == ef
    assert np.array_equal(loaded.search(queries, 50)[1], index.search(queries, 50)[1])
    # already at the target: nothing changes, nothing logged
    logs.clear()
    assert reach_recall(index, queries, want, 0.5, logs.append) == recall and not logs
    assert index.params == {"efSearch": ef}


def test_reach_recall_stops_at_the_cap_with_a_warning_and_leaves_exact_search_alone():
    from indexing.build import reach_recall

    items, ids, queries, want = _crowded_case()
    ivf = build_topk(items, ids, "cosine", "IVF128,Flat", {"nprobe": 1})
    assert ivf.search_effort() == ("nprobe", 1, 16)  # an eighth of 128 lists
    logs: list[str] = []
    recall = reach_recall(ivf, queries, want, 0.99, logs.append)
    assert ivf.params == {"nprobe": 16} and ivf.index.nprobe == 16 and recall < 0.99
    assert "WARNING: recall@50" in logs[-1] and "at nprobe 16" in logs[-1]
    untouched = build_topk(items, ids, "cosine", "HNSW32", {"efSearch": 16})
    assert reach_recall(untouched, queries, want, None) < 0.9  # no target: as configured
    assert untouched.params == {"efSearch": 16}
    for exact in (build_topk(items, ids, "cosine", "Flat"),
                  build_topk(items, ids, "cosine", "exact")):
        assert exact.search_effort() is None
        assert reach_recall(exact, queries, want, 0.99) == pytest.approx(1.0)
        assert exact.params == {}
