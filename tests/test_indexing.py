"""build_index and evaluate on the tiny demo run: versioned embeddings, manifest, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexing.build import check_manifest
from indexing.embed import read_embeddings
from indexing.evaluate import evaluate_run
from pipeline.run_dir import RunDir, read_index_manifest, read_model_meta
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


def test_manifest_describes_the_index_and_guards_the_version(demo_trained):
    manifest = read_index_manifest(RunDir(demo_trained))
    meta = read_model_meta(demo_trained / "model")
    assert manifest.model_version == meta.model_version
    assert (manifest.similarity.value, manifest.metric, manifest.normalized) == (
        "cosine", "inner_product", True)
    assert manifest.index_type == "Flat" and manifest.dim == 16
    assert manifest.recall.value == pytest.approx(1.0)  # Flat is exact

    check_manifest(manifest, meta)
    with pytest.raises(ValueError, match="model_version"):
        check_manifest(manifest.model_copy(update={"model_version": "0" * 16}), meta)
    with pytest.raises(ValueError, match="dim=32"):
        check_manifest(manifest.model_copy(update={"dim": 32}), meta)


def test_evaluate_through_a_flat_index_equals_exact(demo_trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(demo_trained, run_dir)
    out = evaluate_run(run_dir)
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(out))
    for split in ("test", "validation"):
        exact, through = out[split]["exact"], out[split]["index"]
        assert set(exact) == {"HR@10", "HR@50", "HR@100", "NDCG@10"}
        # a Flat index ranks exactly as brute force (the catalogue has 120 items, k=100)
        for key in ("HR@10", "HR@50", "HR@100", "NDCG@10"):
            assert through[key] == pytest.approx(exact[key], abs=1e-9), (split, key)
        assert out[split]["unmasked"]["exact"]["HR@10"] <= 1.0
    assert out["index_recall"]["recall@20"] == pytest.approx(1.0)
    assert out["test"]["users"] == 300
