"""The job log a user reads: a tiny ``jobs.pipeline`` run, as a user starts it.

It runs in a subprocess with its own local Ray (Ray forwards every worker's output to the
driver, so the subprocess's stdout and stderr are the whole log). Ray's chatter is set off
through Ray's settings (``jobs.ray_setup``, ``training.ray_train``); this checks the
result: no PlacementGroupCleaner line, no worker reprinting a ``TrainingReport(...)``, no
Ray Data progress blocks, exactly one line per epoch and one per Ray Data stage.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY

EPOCHS = 3


@pytest.mark.slow
def test_a_tiny_pipeline_logs_one_line_per_epoch_and_no_ray_chatter(demo_data, tmp_path):
    overrides = [f"train.epochs={EPOCHS}", f"train.patience={EPOCHS}",
                 "train.min_improvement=0",
                 # through Ray Data, as data above the in-process bounds goes, to see its log
                 "prepare.local_max_rows=0", "index.local_max_rows=0"]
    cmd = [sys.executable, "-m", "jobs.pipeline", "--config", str(TINY),
           "--output-dir", str(tmp_path / "run"), "--set", f"data.root={demo_data}",
           *[flag for o in overrides for flag in ("--set", o)]]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for key in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"):
        env.pop(key, None)  # a fresh local Ray, as a user's first run
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    lines = log.splitlines()

    assert not [line for line in lines if "PlacementGroupCleaner" in line]
    assert "TrainingReport(" not in log
    epochs = [line for line in lines if re.search(r"\[train\] epoch \d+/", line)]
    assert [re.search(r"epoch (\d+)/", line).group(1) for line in epochs] == ["1", "2", "3"]
    assert all("samples/s" in line and "val HR@10" in line for line in epochs)
    # Ray Data: no progress blocks, no execution-plan lines; one "finished" line per stage
    assert "Running Dataset" not in log and "Execution plan" not in log
    finished = [re.search(r"Dataset (\S+) execution finished", line) for line in lines]
    stages = [m.group(1) for m in finished if m]
    assert len(stages) == len(set(stages)) >= 6  # 3 reads + 3 split writes, at least
    # Ray Train's own INFO lines stay in its log files
    for chatter in ("Setting up process group", "Started training worker group",
                    "Checkpoint successfully created", "Wrapping provided model"):
        assert chatter not in log, chatter
    assert "Seconds per step" in proc.stdout  # the summary still closes the log
