"""A refused rollout never becomes an outage: a restarted replica serves the last good run.

The deployment class is driven directly (no Serve, no model): ``Retriever`` is replaced by
a stand-in that loads any folder holding ``good`` and raises for the rest, as a corrupt
run would. The sequence is the audit's: a good run serves, a rollout to a corrupt run is
refused, then the replica is killed and a new one starts with the corrupt run configured.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pipeline.config.serve import ServeConfig
from serve_app import app as app_module
from serve_app import last_good


class FakeRetriever:
    """Loads a run folder that holds a file ``good``; raises like a corrupt run otherwise."""

    def __init__(self, run_dir, serve_config=None):
        self.run_dir = Path(run_dir).resolve()
        if not (self.run_dir / "good").exists():
            raise ValueError(f"{self.run_dir}/index/index.faiss: truncated")
        self.model_version = self.run_dir.name

    def replay(self) -> int:
        """No events log here."""
        return 0

    @property
    def store(self):
        """A user store with nothing to close."""
        return self

    def close(self) -> None:
        """Nothing to release."""


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(app_module, "Retriever", FakeRetriever)
    for name in ("run-1", "run-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "good").write_text("")
    (tmp_path / "corrupt").mkdir()
    return tmp_path


def replica():
    """A fresh replica (what Serve makes after a kill): the class behind the deployment."""
    cls = app_module.RetrievalDeployment.func_or_class.__mro__[1]  # under serve.ingress
    return cls(ServeConfig().model_dump(mode="json"))


def served(r) -> str:
    return r._current().model_version


def test_a_restart_after_a_refused_rollout_serves_the_old_run(runs):
    async def scenario():
        first = replica()
        await first.reconfigure({"run_dir": str(runs / "run-1")})
        await first.reconfigure({"run_dir": str(runs / "corrupt")})  # refused
        assert served(first) == "run-1" and first._refused_at is not None
        # the replica dies; Serve starts another with the same (corrupt) user_config
        second = replica()
        await second.reconfigure({"run_dir": str(runs / "corrupt")})
        assert served(second) == "run-1" and second._refused_at is not None  # "refused"
        # a good rollout later is served and becomes the new last good run
        await second.reconfigure({"run_dir": str(runs / "run-2")})
        assert served(second) == "run-2" and second._refused_at is None
        third = replica()
        await third.reconfigure({"run_dir": str(runs / "corrupt")})
        assert served(third) == "run-2"

    asyncio.run(scenario())
    record = json.loads((runs / last_good.LAST_GOOD).read_text())
    assert record["run_dir"] == str((runs / "run-2").resolve())


def test_with_no_run_ever_loaded_the_first_load_still_raises(runs):
    async def scenario():
        with pytest.raises(ValueError, match="truncated"):
            await replica().reconfigure({"run_dir": str(runs / "corrupt")})

    asyncio.run(scenario())


def test_a_missing_last_good_run_is_not_a_fallback(runs):
    last_good.write_last_good(runs / "run-1")
    (runs / "run-1" / "good").unlink()  # the last good run was since deleted or broken

    async def scenario():
        with pytest.raises(ValueError, match="corrupt/index"):
            await replica().reconfigure({"run_dir": str(runs / "corrupt")})

    asyncio.run(scenario())
