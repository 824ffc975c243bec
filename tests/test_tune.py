"""``jobs.tune``: two tiny trials on the test session's Ray, the written best config loads and
trains, and the trials never read the test split. Plus the search space's checks."""

from __future__ import annotations

import shutil

import pytest

from jobs import tune as tune_job
from pipeline.config import load_config
from pipeline.run_dir import RunDir
from tests.conftest import ROOT, demo_config
from training.loop import run_plain
from training.tuning import (
    best_config_path,
    check_space,
    concurrency,
    one_process,
    trial_config,
)

SPACE = ('tune.space={"train.lr": {"loguniform": [0.001, 0.01]}, '
         '"model.temperature": {"choice": [0.05, 0.1]}}')


@pytest.mark.slow
def test_two_tiny_trials_write_a_best_config_that_loads_and_trains(ray_session, demo_prepared,
                                                                   demo_data, tmp_path):
    run_dir = tmp_path / "tune"
    shutil.copytree(demo_prepared / "prepared", run_dir / "prepared")
    for part in (run_dir / "prepared" / "test").iterdir():
        part.write_bytes(b"not parquet")  # a trial that opened the test split would fail
    cfg = demo_config(demo_data, "train.epochs=2", "train.patience=2",
                      "train.mlflow.enabled=true", "tune.num_samples=2",
                      "tune.asha.grace_period=1", SPACE)
    summary = tune_job.run(cfg, run_dir)

    trials = summary["trials"]
    assert len(trials) == 2 and [t["error"] for t in trials] == [None, None]
    for t in trials:
        assert 0.001 <= t["sample"]["train.lr"] <= 0.01
        assert t["sample"]["model.temperature"] in (0.05, 0.1)
        assert 1 <= t["best_epoch"] <= t["epochs"] <= 2 and 0 < t["best"] <= 1
    assert summary["best"]["best"] == max(t["best"] for t in trials)
    # the trials saw prepared/ without its test split
    view = run_dir / "tune" / "prepared"
    assert "test" not in {p.name for p in view.iterdir()}
    assert {p.name for p in view.iterdir()} == {
        p.name for p in (run_dir / "prepared").iterdir()} - {"test"}
    trial_dirs = sorted((run_dir / "tune" / "trials").iterdir())
    assert [d.name for d in trial_dirs] == sorted(t["trial"] for t in trials)
    assert all((d / "prepared").resolve() == view.resolve() for d in trial_dirs)
    assert not list((run_dir / "tune" / "search").rglob("prepared"))  # Tune copied no data
    # one MLflow run per trial, a metric per epoch it trained
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name(cfg.train.mlflow.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    assert sorted(len(client.get_metric_history(r.info.run_id, "val/HR_at_50")) for r in runs) \
        == sorted(t["epochs"] for t in trials)

    # the best config is a whole config the pipeline takes, and it trains
    best_file = best_config_path(RunDir(run_dir))
    best = load_config(best_file)
    assert best.to_dict() == trial_config(cfg, summary["best"]["sample"]).to_dict()
    assert best.train.lr == summary["best"]["sample"]["train.lr"]
    metric = load_config(ROOT / "configs" / "demo.yaml").train.early_stopping_metric
    assert best_file.read_text().startswith(f"# jobs.tune: best of 2 trials by val/{metric}")
    fresh = tmp_path / "best"
    shutil.copytree(demo_prepared / "prepared", fresh / "prepared")
    out = run_plain(load_config(best_file, ["train.epochs=1"]), fresh, log=lambda m: None)
    assert len(out["history"]) == 1 and (fresh / "model" / "model.pt").exists()


def test_space_values_are_checked_against_the_config(demo_data):
    cfg = demo_config(demo_data, 'tune.space={"train.batch_size": {"choice": [1, 64]}}')
    with pytest.raises(ValueError, match=r"'train.batch_size' value 1 gives an invalid config"):
        check_space(cfg)
    with pytest.raises(ValueError, match="train has no field 'lrr'"):
        demo_config(demo_data, 'tune.space={"train.lrr": {"uniform": [0.1, 0.2]}}')
    with pytest.raises(ValueError, match="give exactly one of"):
        demo_config(demo_data, 'tune.space={"train.lr": {"uniform": [0.1, 0.2], "choice": [1]}}')
    with pytest.raises(ValueError, match="both bounds must be > 0"):
        demo_config(demo_data, 'tune.space={"train.lr": {"loguniform": [0, 0.2]}}')
    # prepare fixed the tables' widths: a trial could not vary them
    with pytest.raises(ValueError, match=r"'features.user.0.embedding_dim': fixed when the run "
                                         "is prepared"):
        demo_config(demo_data, 'tune.space={"features.user.0.embedding_dim": {"int": [8, 16]}}')


def test_a_trial_is_the_base_config_with_the_sample_at_its_paths(demo_data):
    cfg = demo_config(demo_data)
    trial = trial_config(cfg, {"train.lr": 0.003, "model.user.mlp.hidden": [64, 32],
                               "model.output_dim": 24, "loss.logq_correction": False})
    assert trial.train.lr == 0.003 and trial.model.user.mlp.hidden == [64, 32]
    assert trial.model.output_dim == 24 and trial.loss.logq_correction is False
    assert trial.model.item == cfg.model.item  # the rest as it was


def test_a_plain_trial_steps_the_global_batch_of_the_ray_train_run(demo_data):
    cfg = demo_config(demo_data, "train.batch_size=128", "train.num_workers=2")
    assert one_process(cfg).train.batch_size == 256  # what DDP steps over 2 workers
    assert one_process(demo_config(demo_data, "train.num_workers=0")).train.batch_size == 256


@pytest.mark.parametrize("overrides,cluster,expected", [
    (["tune.cpus_per_trial=1"], {"CPU": 2.0}, 2),  # plain trials: 1 CPU each on 2 CPUs
    (["tune.cpus_per_trial=1", "tune.max_concurrent=1"], {"CPU": 2.0}, 1),
    # a Ray Train trial holds all its workers: 2 x 0.5 CPU -> two trials on 2 CPUs
    (["tune.trainer=ray_train", "train.num_workers=2", "train.cpus_per_worker=0.5"],
     {"CPU": 2.0}, 2),
    (["tune.trainer=ray_train", "train.num_workers=2", "train.cpus_per_worker=1"],
     {"CPU": 5.0}, 2),
    # GPU trials: 16 CPUs but 3 GPUs hold three plain trials, one Ray Train trial of 2
    (["train.use_gpu=true"], {"CPU": 16.0, "GPU": 3.0}, 3),
    (["train.use_gpu=true", "tune.trainer=ray_train", "train.num_workers=2"],
     {"CPU": 16.0, "GPU": 3.0}, 1),
])
def test_trials_are_packed_to_the_cluster(demo_data, overrides, cluster, expected):
    assert concurrency(demo_config(demo_data, *overrides), cluster) == expected


def test_a_trial_larger_than_the_cluster_is_an_error(demo_data):
    cfg = demo_config(demo_data, "tune.cpus_per_trial=4")
    with pytest.raises(ValueError, match="one trial needs {'CPU': 4.0}"):
        concurrency(cfg, {"CPU": 2.0})
