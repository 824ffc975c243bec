"""A doctored exported tower cannot run code: refused before loading, and nothing ran.

Each case plants a pickle payload in a real ``torch.export`` archive the way
``torch.export.load`` (torch 2.13) would unpickle it: a weight marked ``use_pickle``, an
``opaque_obj_`` constant (``pickle.loads``, which ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` does not
reach) and sample inputs that only ``weights_only=False`` reads. The payload writes a marker
file; the test first shows that plain ``torch.export.load`` runs it, then that
:class:`towers.exported.ExportedTower` refuses the archive and the marker stays absent.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from towers.exported import FORMAT, WEIGHTS_ONLY_ENV, ExportedTower, sidecar_path


class Tiny(nn.Module):
    """``{"x": [B, 3]} -> {"user_emb": [B, 2]}``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"user_emb": self.linear(features["x"])}


class Payload:
    """Unpickling it writes ``marker``: stands for any code a pickle can run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("export") / "user_tower.pt2"
    torch.manual_seed(0)
    program = torch.export.export(Tiny(), ({"x": torch.randn(4, 3)},))
    torch.export.save(program, str(path))
    sidecar_path(path).write_text(json.dumps(
        {"format": FORMAT, "inputs": {"x": {"dtype": "float32"}}, "output": "user_emb",
         "output_dim": 2}))
    return path


def doctor(clean: Path, out: Path, replace: dict[str, bytes], add: dict[str, bytes]) -> Path:
    """A copy of ``clean`` with entries (relative to the archive root) replaced or added."""
    with zipfile.ZipFile(clean) as src, zipfile.ZipFile(out, "w") as dst:
        root = src.namelist()[0].split("/", 1)[0]
        for name in src.namelist():
            inner = name.split("/", 1)[1]
            dst.writestr(name, replace.get(inner, src.read(name)))
        for inner, data in add.items():
            dst.writestr(f"{root}/{inner}", data)
    sidecar_path(out).write_text(sidecar_path(clean).read_text())
    return out


def _read(clean: Path, inner: str) -> bytes:
    with zipfile.ZipFile(clean) as src:
        root = src.namelist()[0].split("/", 1)[0]
        return src.read(f"{root}/{inner}")


def pickled_weight(clean: Path, out: Path, marker: Path) -> Path:
    config = json.loads(_read(clean, "data/weights/model_weights_config.json"))
    config["config"]["linear.weight"]["use_pickle"] = True
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return doctor(clean, out, {"data/weights/model_weights_config.json":
                               json.dumps(config).encode(),
                               "data/weights/weight_0": buffer.getvalue()}, {})


def opaque_constant(clean: Path, out: Path, marker: Path) -> Path:
    config = {"config": {"evil": {"path_name": "opaque_obj_0", "is_param": False,
                                  "use_pickle": True, "tensor_meta": None}}}  # as torch writes one
    return doctor(clean, out, {"data/constants/model_constants_config.json":
                               json.dumps(config).encode()},
                  {"data/constants/opaque_obj_0": pickle.dumps(Payload(marker))})


def pickled_sample_inputs(clean: Path, out: Path, marker: Path) -> Path:
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    return doctor(clean, out, {"data/sample_inputs/model.pt": buffer.getvalue()}, {})


CASES = {"use_pickle weight": pickled_weight, "opaque constant": opaque_constant,
         "pickled sample inputs": pickled_sample_inputs}


def test_the_clean_archive_loads_and_answers(clean):
    tower = ExportedTower(clean)
    out = tower({"x": torch.ones(4, 3)})["user_emb"]
    assert out.shape == (4, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_planted_pickle_is_refused_and_nothing_runs(clean, tmp_path, monkeypatch, case):
    marker = tmp_path / "ran"
    doctored = CASES[case](clean, tmp_path / "user_tower.pt2", marker)
    # the payload is live: torch's own loader, as main called it, runs it
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    try:
        torch.export.load(str(doctored))
    except Exception:  # noqa: BLE001 - a payload may break the load after it ran
        pass
    assert marker.read_text() == "ran"
    marker.unlink()

    with pytest.raises(ValueError, match="refused before loading") as err:
        ExportedTower(doctored)
    assert str(doctored) in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("case", ["use_pickle weight", "pickled sample inputs"])
def test_the_environment_alone_stops_torch_load_pickles(clean, tmp_path, monkeypatch, case):
    # the second guard: with the archive check bypassed, TORCH_FORCE_WEIGHTS_ONLY_LOAD=1
    # (set in the replicas' and jobs' environment) still stops torch.load's fallback
    marker = tmp_path / "ran"
    doctored = CASES[case](clean, tmp_path / "user_tower.pt2", marker)
    for key, value in WEIGHTS_ONLY_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(Exception):  # noqa: B017 - whatever torch raises on the refusal
        torch.export.load(str(doctored))
    assert not marker.exists()


def test_an_entry_outside_the_plain_layout_is_refused(clean, tmp_path):
    doctored = doctor(clean, tmp_path / "user_tower.pt2", {},
                      {"data/aotinductor/model/model.so": b"\x7fELF"})
    with pytest.raises(ValueError, match="data/aotinductor/model/model.so"):
        ExportedTower(doctored)


def test_the_jobs_and_the_replica_carry_the_weights_only_setting():
    from jobs import ray_setup
    from pipeline.config.serve import ServeConfig
    from serve_app.app import deployment_options

    assert WEIGHTS_ONLY_ENV.items() <= ray_setup.RAY_DEFAULTS.items()
    env = deployment_options(ServeConfig())["ray_actor_options"]["runtime_env"]["env_vars"]
    assert WEIGHTS_ONLY_ENV.items() <= env.items()
