"""build_index and evaluate on the tiny demo run: versioned embeddings, manifest, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from indexing.batches import embed
from indexing.build import check_manifest, read_index_manifest
from indexing.embed import read_embeddings
from indexing.eval_set import EvalSet, load_eval_set
from indexing.evaluate import MISS, evaluate_run, index_metrics, index_ranks, split_metrics
from indexing.metrics import retrieval_metrics, target_ranks
from indexing.topk.store import build_topk
from pipeline.columns import ITEM, USER
from pipeline.run_dir import RunDir, read_catalogue, read_model_meta
from towers.model import load_trained


def test_embeddings_are_partitioned_by_model_version(demo_trained):
    meta = read_model_meta(demo_trained / "model")
    folder = RunDir(demo_trained).embeddings("item", meta.model_version)
    assert folder.name == f"model_version={meta.model_version}"
    info = json.loads((folder / "_run.json").read_text())
    assert info["model_version"] == meta.model_version
    assert info["feature_state_hash"] == meta.feature_state_hash
    keys, rows, emb = read_embeddings(folder, "item_id")
    assert rows.tolist() == list(range(len(rows)))  # every catalogue row, once
    # the batch job's vectors are the model's: recompute a few rows in-process
    from indexing.embed import local_embed

    model, *_ = load_trained(RunDir(demo_trained))
    np.testing.assert_allclose(local_embed(RunDir(demo_trained), "item", model.encode_item), emb,
                               atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # cosine


def test_small_tables_embed_in_process_as_the_actor_pool_does(demo_trained, demo_data,
                                                               tmp_path):
    # index.local_max_rows: the same TowerEmbedder in this process (batches of 50 rows here)
    # writes the keys, rows and vectors the Ray Data actor pool wrote for demo_trained
    import shutil

    from indexing.embed import embed_table, in_process
    from pipeline.columns import ITEM, USER
    from tests.conftest import demo_config

    run_dir = tmp_path / "run"
    shutil.copytree(demo_trained, run_dir, ignore=shutil.ignore_patterns("embeddings", "index"))
    cfg = demo_config(demo_data, "index.batch_size=50").index
    assert in_process(cfg, cfg.local_max_rows) and not in_process(cfg, cfg.local_max_rows + 1)
    meta = read_model_meta(run_dir / "model")
    started = []
    for tower, key in ((ITEM, "item_id"), (USER, "user_id")):
        folder, where = embed_table(RunDir(run_dir), tower, key, meta, cfg,
                                    start_ray=lambda: started.append(1))
        assert where.startswith("in this process") and not started  # Ray never asked for
        ours = read_embeddings(folder, key)
        pool = read_embeddings(RunDir(demo_trained).embeddings(tower, meta.model_version), key)
        assert len(ours[1]) > 50  # more than one batch
        for a, b in zip(ours, pool, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert json.loads((folder / "_run.json").read_text())["model_version"] \
            == meta.model_version


def test_manifest_describes_the_index_and_guards_the_version(demo_trained):
    manifest = read_index_manifest(RunDir(demo_trained))
    meta = read_model_meta(demo_trained / "model")
    assert manifest.model_version == meta.model_version
    assert manifest.index.model_dump(mode="json") == {
        "kind": "faiss", "factory": "Flat", "similarity": "cosine", "dim": 16,
        "count": manifest.index.count, "params": {}}
    catalogue = read_catalogue(RunDir(demo_trained))
    assert manifest.index.count == len(next(iter(catalogue.values()))) > 0
    assert sorted(p.name for p in (demo_trained / "index").iterdir()) == [
        "ids.npy", "index.faiss", "manifest.json"]  # one metadata file
    assert manifest.recall.value == pytest.approx(1.0)  # Flat is exact

    check_manifest(manifest, meta)
    with pytest.raises(ValueError, match="model_version"):
        check_manifest(manifest.model_copy(update={"model_version": "0" * 16}), meta)
    with pytest.raises(ValueError, match="dim=32"):
        check_manifest(manifest.model_copy(
            update={"index": manifest.index.model_copy(update={"dim": 32})}), meta)


def _numpy_ranks(u: np.ndarray, v: np.ndarray, eval_set: EvalSet, masked: bool) -> np.ndarray:
    """Oracle: items scoring strictly above the target (float64), history removed if masked."""
    s = u.astype(np.float64) @ v.astype(np.float64).T  # [U, I]
    off, hist = eval_set.history_offsets, eval_set.history_items
    ranks = []
    for i, t in enumerate(eval_set.targets):
        keep = np.ones(s.shape[1], bool)
        if masked:
            keep[hist[off[i]:off[i + 1]]] = False
            keep[t] = True
        ranks.append(int((s[i][keep] > s[i, t]).sum()))
    return np.array(ranks)


def _oracle_metrics(ranks: np.ndarray) -> dict[str, float]:
    out = {f"HR@{k}": float(np.mean(ranks < k)) for k in (10, 50, 100)}
    out["NDCG@10"] = float(np.mean(np.where(ranks < 10, 1 / np.log2(ranks + 2), 0.0)))
    return out


def test_evaluate_through_a_flat_index_equals_exact(demo_trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(demo_trained, run_dir)
    out = evaluate_run(run_dir)
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(out))
    run = RunDir(run_dir)
    model, *_ = load_trained(run)
    items = embed(model.encode_item, read_catalogue(run), ITEM)
    for split in ("test", "validation"):
        exact, through = out[split]["exact"], out[split]["index"]
        assert set(exact) == {"HR@10", "HR@50", "HR@100", "NDCG@10"}
        # a Flat index ranks exactly as brute force (the catalogue has 120 items, k=100)
        for key in ("HR@10", "HR@50", "HR@100", "NDCG@10"):
            assert through[key] == pytest.approx(exact[key], abs=1e-9), (split, key)
        # every figure against a float64 numpy oracle over the model's own embeddings
        eval_set = load_eval_set(run, split)
        users = embed(model.encode_user, eval_set.user_inputs, USER)
        for name, masked in (("masked", True), ("unmasked", False)):
            want = _oracle_metrics(_numpy_ranks(users.numpy(), items.numpy(), eval_set, masked))
            got = exact if masked else out[split]["unmasked"]["exact"]
            assert got == pytest.approx(want, abs=1e-9), (split, name)
        # the masked figures over the targets not already in the user's history
        off, hist = eval_set.history_offsets, eval_set.history_items
        new = np.array([t not in hist[off[i]:off[i + 1]]
                        for i, t in enumerate(eval_set.targets)])
        ranks = _numpy_ranks(users.numpy(), items.numpy(), eval_set, True)
        assert out[split]["new_targets"] == pytest.approx(
            {"share": new.mean(), **_oracle_metrics(ranks[new])}, abs=1e-9), split
    assert out["index_recall"]["recall@20"] == pytest.approx(1.0)
    assert out["test"]["users"] == 300


def test_flat_index_equals_exact_with_many_tied_items(demo_trained):
    """110 of the 120 catalogue rows share one vector that most users score highest.

    A Flat index returns the tied rows in row order, so a target at row 100..109 is not among
    the k=100 returned; ranked by position it was a miss while exact ranking (ties in the
    target's favour) counts it at rank 0. Through the index it must count the same.
    """
    run = RunDir(demo_trained)
    model, *_ = load_trained(run)
    items = embed(model.encode_item, read_catalogue(run), ITEM)
    eval_set = load_eval_set(run, "test")
    users = embed(model.encode_user, eval_set.user_inputs, USER)
    tied = torch.nn.functional.normalize(users.mean(0), dim=0)
    items[:110] = tied
    eval_set.targets[:40] = np.arange(100, 110).repeat(4)  # targets late in the tie group
    index = build_topk(items.numpy(), np.arange(len(items)), "cosine", "Flat")
    out = split_metrics(users, items, index, eval_set)
    for kind in ("masked", "unmasked"):
        exact = out["exact"] if kind == "masked" else out["unmasked"]["exact"]
        through = out["index"] if kind == "masked" else out["unmasked"]["index"]
        want = _oracle_metrics(_numpy_ranks(users.numpy(), items.numpy(), eval_set,
                                            kind == "masked"))
        assert exact == pytest.approx(want, abs=1e-9), kind
        assert through == pytest.approx(exact, abs=1e-9), kind
    # the ties are really there: rows 100..109 are never returned in the top 100 ...
    _, ids = index.search(users.numpy(), 100)
    assert not np.isin(ids[:40], np.arange(100, 110)).any()
    # ... yet those targets rank inside the top 10 for most of those users
    ranks = index_ranks(index, users, items, eval_set, 100, masked=False)
    assert (ranks[:40] < 10).mean() > 0.5
    assert (ranks[:40] == _numpy_ranks(users.numpy(), items.numpy(), eval_set, False)[:40]).all()


def test_index_ranks_hand_worked_ties():
    # 5 items in 1-d (dot): scores of the one user (u = 1) are the item values.
    # items: 0.9, 0.5, 0.5, 0.5, 0.1; target = item 3 (score 0.5); k = 2 returns items 0, 1.
    # exact rank: 1 (only item 0 is strictly higher); through the index: item 1 ties the
    # target, so the target is reached, and 1 returned item is strictly above -> rank 1.
    items = torch.tensor([[0.9], [0.5], [0.5], [0.5], [0.1]])
    users = torch.tensor([[1.0]])
    index = build_topk(items.numpy(), np.arange(5), "dot", "Flat")
    def one(target, k, hist=()):
        es = EvalSet({}, np.array([target]), np.array([0, len(hist)]), np.array(hist, np.int64))
        return int(index_ranks(index, users, items, es, k, masked=True)[0])
    assert one(3, 2) == 1
    assert one(4, 2) == MISS  # 0.1: neither returned nor tied by anything returned
    assert one(4, 5) == 4  # returned at last: 4 items strictly above
    assert one(3, 1) == MISS  # only item 0 returned (0.9 > 0.5): not reached
    assert one(3, 2, hist=(0,)) == 0  # item 0 masked: items 1 and 2 tie the target -> rank 0


def test_nan_target_score_is_an_error_not_a_hit():
    scores = torch.tensor([[0.3, float("nan"), 0.1], [0.2, 0.4, 0.5]])
    with pytest.raises(ValueError, match=r"target score of 1 of 2 users is NaN \(the first: row "
                                         r"0, target item 1\)"):
        target_ranks(scores, torch.tensor([1, 0]))
    assert target_ranks(scores[1:], torch.tensor([0])).tolist() == [2]


@pytest.mark.parametrize("where", ["user", "item"])
def test_non_finite_embeddings_are_an_error(where):
    users, items = torch.ones(4, 3), torch.ones(6, 3)
    (users if where == "user" else items)[2, 1] = float("inf")
    with pytest.raises(ValueError, match=rf"{where} embeddings: 1 of \d rows hold NaN or "
                                         r"infinite values \(the first: row 2\)"):
        retrieval_metrics(users, items, np.zeros(4, np.int64), np.zeros(5, np.int64),
                          np.zeros(0, np.int64))
    index = build_topk(items.nan_to_num(posinf=1.0).numpy(), np.arange(6), "dot", "Flat")
    es = EvalSet({}, np.zeros(4, np.int64), np.zeros(5, np.int64), np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=rf"{where} embeddings: 1 of"):
        index_metrics(index, users, items, es)
