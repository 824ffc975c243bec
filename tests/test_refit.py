"""``train.refit``: the final model trains on training + validation, never on test.

A demo run is prepared in this process twice, with refit off and on. With refit, the
sequence windows hold each user's training and validation items (and no test item), the
interaction mode reads both split folders, the item counts and the svd factors see the
validation rows, and the loop trains exactly ``train.epochs`` epochs with no validation
figures; without it, nothing of that changes. Jobs refuse a refit config on a run
prepared without it, and a search refuses refit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from indexing.eval_set import train_item_counts
from pipeline.columns import ITEM_INDEX, SEQUENCE_ITEMS, USER_KEY
from pipeline.run_dir import RunDir, read_catalogue, read_split, require_prepared_as
from tests.conftest import SEQUENCE_OVERRIDES, demo_config
from training.data import load_shard, shard_rows, train_table
from training.item_init import svd_item_factors
from training.loop import run_plain, selection_metric

REFIT = "train.refit=true"




def _per_user(table, items_column: str) -> dict[int, list[int]]:
    """user -> real items in order (windows: consecutive ones share their end item)."""
    out: dict[int, list[int]] = {}
    for user, items in zip(table["user_id"], table[items_column], strict=True):
        items = [i for i in np.atleast_1d(items) if i >= 0]
        mine = out.setdefault(user, [])
        mine.extend(items[1:] if mine and mine[-1] == items[0] else items)
    return out


@pytest.mark.parametrize("refit", [False, True])
def test_windows_hold_training_and_with_refit_validation_items_never_test(refit_runs, refit):
    run = RunDir(refit_runs[1][refit])
    windows = _per_user(read_split(run, "sequences").to_pydict(), SEQUENCE_ITEMS)
    splits = ["train", "validation"] if refit else ["train"]
    rows = {s: read_split(run, s, ["user_id", ITEM_INDEX]).to_pydict() for s in splits}
    expected: dict[int, list[int]] = {}
    for s in splits:  # a user's validation item comes after every training item
        for user, item in zip(rows[s]["user_id"], rows[s][ITEM_INDEX], strict=True):
            expected.setdefault(user, []).append(item)
    assert windows == {u: v for u, v in expected.items() if len(v) >= 2}
    test = read_split(run, "test", ["user_id", ITEM_INDEX]).to_pydict()
    last = {u: v[-1] for u, v in windows.items()}
    validation = dict(zip(rows.get("validation", rows["train"])["user_id"],
                          rows.get("validation", rows["train"])[ITEM_INDEX], strict=True))
    # with refit each user's windows end on the validation item; never on the test item
    if refit:
        assert all(last[u] == validation[u] for u in last)
    n_test_last = sum(last.get(u) == i for u, i in zip(test["user_id"], test[ITEM_INDEX],
                                                       strict=True))
    assert n_test_last < 0.1 * len(last)  # only where the test item repeats an earlier one


def test_refit_reads_validation_rows_in_the_interaction_mode_and_the_counts(refit_runs):
    data, prepared = refit_runs
    run = RunDir(prepared[True])
    n = {s: read_split(run, s, [USER_KEY]).num_rows for s in ("train", "validation")}
    plain, refit = demo_config(data), demo_config(data, REFIT)
    assert [p.name for p in train_table(run, plain)] == ["train"]
    assert [p.name for p in train_table(run, refit)] == ["train", "validation"]
    assert shard_rows(load_shard(train_table(run, refit))) == n["train"] + n["validation"]
    assert shard_rows(load_shard(train_table(run, plain))) == n["train"]
    items = len(next(iter(read_catalogue(run).values())))
    assert train_item_counts(run, items).sum() == n["train"]
    counts = train_item_counts(run, items, refit=True)
    assert counts.sum() == n["train"] + n["validation"]
    # the svd factors read the same rows: the refit ones move with the validation rows
    rows = {s: read_split(run, s, [USER_KEY, ITEM_INDEX]) for s in ("train", "validation")}
    users = np.concatenate([np.asarray(rows[s][USER_KEY]) for s in rows])
    both = np.concatenate([np.asarray(rows[s][ITEM_INDEX]) for s in rows])
    assert not np.allclose(svd_item_factors(users, both, items, 8),
                           svd_item_factors(users[:n["train"]], both[:n["train"]], items, 8))


def test_a_refit_run_trains_every_epoch_with_no_validation(refit_runs, tmp_path):
    data, prepared = refit_runs
    run_dir = tmp_path / "run"
    shutil.copytree(prepared[True] / "prepared", run_dir / "prepared")
    # patience 1 and a huge min_improvement would stop a validated run after epoch 2
    cfg = demo_config(data, *SEQUENCE_OVERRIDES, REFIT, "train.epochs=3", "train.patience=1",
                      "train.min_improvement=1.0", "model.item_id_init=svd")
    lines: list[str] = []
    out = run_plain(cfg, run_dir, log=lines.append)
    assert [int(m["epoch"]) for m in out["history"]] == [1, 2, 3]
    assert not any(k.startswith("val/") for m in out["history"] for k in m)
    assert out["best_epoch"] == 3 and selection_metric(cfg) == "epoch"
    assert all("val none (train.refit" in line for line in lines if "epoch" in line)
    saved = torch.load(run_dir / "model" / "model.pt", weights_only=True)
    latest = torch.load(run_dir / "plain" / "latest" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], latest[k]) for k in saved)  # the last epoch is served


def test_jobs_refuse_refit_on_a_run_prepared_without_it_and_search_refuses_refit(refit_runs,
                                                                                 tmp_path):
    from training.tuning import run_search

    data, prepared = refit_runs
    with pytest.raises(ValueError, match=r"train\.refit: False -> True.*jobs\.prepare"):
        require_prepared_as(RunDir(prepared[False]), demo_config(data, REFIT))
    with pytest.raises(ValueError, match=r"train\.refit: True -> False"):
        require_prepared_as(RunDir(prepared[True]), demo_config(data))
    space = "tune.space={train.lr: {loguniform: [0.001, 0.01]}}"
    with pytest.raises(ValueError, match="train.refit trains on the validation targets"):
        run_search(demo_config(data, REFIT, space), Path(prepared[True]))




def test_the_pipeline_summary_of_a_refit_run_shows_test_figures_only(tmp_path):
    from jobs.pipeline import summary

    figures = {"HR@10": 0.058, "HR@50": 0.13, "HR@100": 0.18, "NDCG@10": 0.0326}
    split = {"exact": figures, "index": figures, "popularity": figures}
    metrics = {"test": split, "trained_on": ["train", "validation"], "model_version": "v",
               "index_recall": {"recall@100": 1.0, "index_type": "Flat"}}
    text = summary(metrics, tmp_path, {"train": 1.0}, tmp_path / "serve.yaml", "http://x")
    assert "the model trained on train + validation:" in text
    assert "| test | exact | 0.0580 | 0.1300 | 0.1800 | 0.0326 |" in text
    assert "| validation |" not in text
    both = {**metrics, "validation": split, "trained_on": ["train"]}
    assert "| validation | exact |" in summary(both, tmp_path, {}, tmp_path / "s.yaml", "u")
