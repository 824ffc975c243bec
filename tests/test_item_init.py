"""model.item_id_init=svd: PureSVD item factors written into the item id table."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from training.item_init import init_item_ids, svd_item_factors


def _interactions(seed=0, users=40, items=12, n=150):
    rng = np.random.default_rng(seed)
    return rng.integers(0, users, n), rng.integers(0, items, n)


def test_full_rank_factors_square_to_the_item_gram():
    users, items = _interactions()
    f = svd_item_factors(users * 7 + 3, items, 12, 12)  # any user keys
    x = np.zeros((40, 12))
    x[users, items] = 1.0  # a repeated pair counts once
    gram = f.astype(np.float64) @ f.T  # V S V^T
    np.testing.assert_allclose(gram @ gram, x.T @ x, atol=1e-3)


def test_factors_beyond_the_rank_are_zero():
    f = svd_item_factors(np.array([0, 0, 1]), np.array([0, 1, 1]), 5, 8)
    assert f.shape == (5, 8) and not f[:, 5:].any()
    assert not f[2:].any()  # items nobody bought: no direction


def test_table_rows_of_the_catalogue_are_written_and_rescaled(tmp_path):
    users, items = _interactions(1)
    train = tmp_path / "prepared" / "train"
    train.mkdir(parents=True)
    pq.write_table(pa.table({"user_id": users, "item_index": items}), train / "part-0.parquet")
    from pipeline.run_dir import RunDir

    table = nn.Embedding(2 + 12, 6, padding_idx=0)
    before = table.weight.detach().clone()
    catalogue_ids = np.array([1] + list(range(3, 14)))  # row 0 is out of vocabulary
    written = init_item_ids(table, catalogue_ids, RunDir(tmp_path), std=0.05)
    assert written == 11
    w = table.weight.detach()
    assert torch.equal(w[:3], before[:3])  # padding, OOV and the unused id 2 as drawn
    assert abs(float(w[3:].std()) - 0.05) < 1e-3
    expected = svd_item_factors(users, items, 12, 6)[1:]
    cos = nn.functional.cosine_similarity(w[3:], torch.from_numpy(expected), dim=1)
    assert bool((cos > 0.999).all())


def test_training_setup_starts_from_the_factors(demo_prepared, demo_data, tmp_path):
    import shutil

    from tests.conftest import demo_config
    from training.loop import setup

    shutil.copytree(demo_prepared / "prepared", tmp_path / "prepared")
    cfg = demo_config(demo_data, "model.item_id_init=svd")
    s = setup(cfg, tmp_path, torch.device("cpu"), 1, 0)
    encoder = s.model.item_tower.encoder
    table = encoder.table(encoder.id_name).weight.detach()
    ids = torch.as_tensor(np.array(s.catalogue["item__item_id"], np.int64))
    plain = setup(demo_config(demo_data), tmp_path, torch.device("cpu"), 1, 0)
    drawn = plain.model.item_tower.encoder.table(encoder.id_name).weight.detach()
    assert not torch.equal(table[ids], drawn[ids])
    assert abs(float(table[ids].std()) - cfg.model.embedding_init_std) < 0.2 * \
        cfg.model.embedding_init_std
    # the written rows are the run's PureSVD factors (OOV catalogue rows excepted)
    from pipeline.arrow import column_to_numpy
    from pipeline.run_dir import RunDir, read_split

    train = read_split(RunDir(tmp_path), "train", ["user_id", "item_index"])
    factors = torch.from_numpy(svd_item_factors(
        column_to_numpy(train["user_id"]), column_to_numpy(train["item_index"]), len(ids),
        table.shape[1], cfg.train.seed))
    known = ids > 1
    cos = nn.functional.cosine_similarity(table[ids][known], factors[known], dim=1)
    assert bool((cos > 0.999).all())


def test_svd_without_an_item_id_feature_is_refused_at_config_time(tmp_path):
    from tests.conftest import demo_config

    with pytest.raises(ValueError, match="item_id_init=svd .* no id feature"):
        demo_config(tmp_path, "model.item_id_init=svd",
                    "model.item.features=[category, tags, title, price, year]")
    with pytest.raises(ValueError, match="item_id_lr_scale=0.1 .* no id feature"):
        demo_config(tmp_path, "model.item_id_lr_scale=0.1",
                    "model.item.features=[category, tags, title, price, year]")


def test_the_id_table_steps_at_its_own_scaled_lr(demo_prepared, demo_data, tmp_path):
    import shutil

    from tests.conftest import demo_config
    from training.loop import id_table, setup
    from training.step import train_epoch

    shutil.copytree(demo_prepared / "prepared", tmp_path / "prepared")
    moved = {}
    for scale in (0.0, 0.25, 1.0):
        cfg = demo_config(demo_data, "model.item_id_init=svd", f"model.item_id_lr_scale={scale}",
                          "train.schedule=constant", "train.warmup_steps=0")
        s = setup(cfg, tmp_path, torch.device("cpu"), 1, 0)
        table = id_table(s.model).weight
        groups = [g for g in s.opt.param_groups if any(p is table for p in g["params"])]
        assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(cfg.train.lr * scale)
        if scale != 1.0:  # a group of its own
            assert len(groups[0]["params"]) == 1
        before = table.detach().clone()
        others = {n: p.detach().clone() for n, p in s.model.named_parameters()
                  if p is not table}
        batches = [{k: v[:64] for k, v in s.shard.items()}]
        train_epoch(s.module, s.task, batches, s.opt, s.scheduler, cfg.train, s.device)
        moved[scale] = float((table.detach() - before).abs().max())
        now = dict(s.model.named_parameters())
        assert any(not torch.equal(now[n].detach(), p) for n, p in others.items())  # the towers
    # frozen at 0; a quarter of the lr moves (Adam's first step) a quarter as far
    assert moved[0.0] == 0.0 and moved[0.25] == pytest.approx(moved[1.0] / 4, rel=0.05)
