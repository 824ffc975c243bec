"""Plain-mode training survives kill -9, a failed checkpoint write and a broken store.

The prepared demo run is made in process (no Ray). A child process trains and kills
itself with SIGKILL right after epoch 2 is reported; the rerun must resume at epoch 3
and MLflow must hold each epoch once. A checkpoint write that fails half-way leaves the
previous checkpoint; an MLflow store that cannot be written is one ``error:`` line.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.run_dir import MODEL_FILE, RunDir
from tests.conftest import DEMO_SIZES, ROOT, TINY, demo_config
from training import checkpoint as ckpt
from training.loop import run_plain

EPOCHS = ("train.epochs=3", "train.patience=3", "train.mlflow.enabled=true")

KILLED_AFTER_EPOCH_2 = """
import os, signal, sys
from pathlib import Path
from tests.conftest import demo_config
from training.loop import run_plain

def log(line):
    print(line, flush=True)
    if line.startswith("[train] epoch 2/"):
        os.kill(os.getpid(), signal.SIGKILL)

run_plain(demo_config(Path(sys.argv[1]), *sys.argv[3:]), Path(sys.argv[2]), log=log)
"""


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(demo data, a RUN_DIR with prepared/), prepared in this process."""
    from prepare.run import run_prepare
    from prepare.sources.demo import generate_demo_data

    root = tmp_path_factory.mktemp("resume")
    generate_demo_data(str(root / "data"), seed=3, **DEMO_SIZES)
    run_prepare(demo_config(root / "data"), root / "run", log=lambda m: None, ray_data=False)
    return root / "data", root / "run"


def fresh_run(prepared, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(prepared[1] / "prepared", run_dir / "prepared")
    return run_dir


def test_kill_9_after_epoch_2_resumes_at_epoch_3_with_each_mlflow_step_once(prepared,
                                                                            tmp_path):
    data, _ = prepared
    run_dir = fresh_run(prepared, tmp_path)
    child = subprocess.run([sys.executable, "-c", KILLED_AFTER_EPOCH_2, str(data),
                            str(run_dir), *EPOCHS], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert child.stdout.count("[train] epoch ") == 2
    assert ckpt.train_state(RunDir(run_dir).plain_latest).epoch == 2

    lines: list[str] = []
    out = run_plain(demo_config(data, *EPOCHS), run_dir, log=lines.append)
    assert lines[0] == f"[train] resuming after epoch 2 from {RunDir(run_dir).plain_latest}"
    assert [line.split(" loss")[0] for line in lines[1:]] == ["[train] epoch 3/3"]
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3]  # epochs 1-2 kept, not redone
    # the optimizer went on: the step count continues from epoch 2's
    steps = ckpt.train_state(RunDir(run_dir).plain_latest).step
    assert steps == 3 * (steps // 3) and steps > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "mlruns").as_uri())
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    logged = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in logged) == [1, 2, 3]
    assert [m.value for m in sorted(logged, key=lambda m: m.step)] == pytest.approx(
        [h["train/loss"] for h in out["history"]])


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint(prepared, tmp_path,
                                                                  monkeypatch):
    from pipeline.run_dir import ModelMeta

    path = tmp_path / "plain" / "best"
    model = torch.nn.Linear(3, 2)
    meta = ModelMeta(config=demo_config(prepared[0]), feature_state_hash="h",
                     model_version="v1", metrics={}, is_best=True)
    ckpt.save_checkpoint(path, model, None, None, ckpt.TrainState(epoch=1), meta)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)

    def torn_save(obj, target, *args, **kwargs):  # a disk that fills up half-way
        Path(target).write_bytes(b"PK\x03\x04 torn")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 384 "
                           "vs 256\nPytorchStreamWriter failed writing file data/0: file "
                           "write failed")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError, match=rf"cannot write the checkpoint {path}: "
                                      r"PytorchStreamWriter failed writing file data/0"):
        ckpt.save_checkpoint(path, model, None, None, ckpt.TrainState(epoch=2), meta)
    monkeypatch.undo()
    kept = torch.load(path / MODEL_FILE, weights_only=True)
    assert all(torch.equal(kept[k], before[k]) for k in before)
    assert ckpt.train_state(path).epoch == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["best"]  # no .tmp left


def test_an_unwritable_mlflow_store_is_one_error_line(prepared, tmp_path, capsys):
    from jobs import train

    run_dir = fresh_run(prepared, tmp_path)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    store = f"file://{blocker}/mlruns"
    with pytest.raises(SystemExit) as exit_:
        sets = [f"data.root={prepared[0]}",  # configs/tiny.yaml, as the run was prepared
                "train.mlflow.enabled=true", f"train.mlflow.tracking_uri={store}",
                "train.epochs=1"]
        train.main(["--config", str(TINY), "--output-dir",
                    str(run_dir), *[a for o in sets for a in ("--set", o)], "--no-ray"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: MLflow tracking at {store}: "
                                               "starting the run failed: "), err
