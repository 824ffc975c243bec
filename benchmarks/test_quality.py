"""benchmarks/quality.py's SASRec peer: chosen on training windows, then refit."""

from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path

from pipeline.run_dir import RunDir, read_split
from tests.conftest import SEQUENCE_OVERRIDES, demo_config

REFIT = "train.refit=true"


def test_the_sasrec_peer_is_chosen_on_training_windows_then_refit(refit_runs, tmp_path,
                                                                  monkeypatch):
    import benchmarks.sasrec as sasrec
    from benchmarks.quality import sasrec_row, summarise

    data, prepared = refit_runs
    run_dir = tmp_path / "run-0"
    shutil.copytree(prepared[True] / "prepared", run_dir / "prepared")
    calls = []
    real_train = sasrec.train

    def train(run, shape, log=print, validate=True):
        calls.append((Path(run).name, shape.epochs, validate))
        return real_train(run, shape, log, validate)

    monkeypatch.setattr(sasrec, "train", train)
    args = Namespace(sasrec_dropout=[0.2, 0.5], sasrec_negatives=[0], sasrec_epochs=3,
                     tiny=False)
    row = sasrec_row(run_dir, args, demo_config(data, *SEQUENCE_OVERRIDES, REFIT))
    # chosen on windows of the training split alone: the ones a run without refit has
    chosen_on = RunDir(tmp_path / "sasrec-selection")
    assert read_split(chosen_on, "sequences").equals(
        read_split(RunDir(prepared[False]), "sequences"))
    assert calls[:2] == [("sasrec-selection", 3, True), ("sasrec-selection", 3, True)]
    assert calls[2:] == [("run-0", row["best_epoch"], False)]  # then refit, scored on test
    assert row["refit"] is True and 1 <= row["best_epoch"] <= 3
    assert row["validation"]["NDCG@10"] == max(t["NDCG@10"] for t in row["tried"])
    assert 0 <= row["test"]["NDCG@10"] <= row["test"]["HR@10"] <= 1
    # a refit family has no validation figures to summarise
    assert summarise([{"test": {}, "validation": None, "wall_s": 1.0}], "validation") is None
