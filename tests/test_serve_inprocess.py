"""Serving in-process: request encoding without skew, exact answers, the version guard.

Logic is tested on a :class:`~serve_app.retriever.Retriever` and the app's builders, without
Serve: a request encodes exactly as prepare encoded the row, batched answers equal one by
one, a corrupt run is refused naming the file, and the check tool says so before a rollout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, demo_config
from tests.serve_cases import (  # noqa: F401  (fixtures, registered by import)
    CORRUPTIONS,
    batch_embeddings,
    corrupt_runs,
    retriever,
    sample_test_users,
    second_model,
    tampered_run,
    users,
)


def test_known_user_alone_gives_the_stored_row(retriever, users):
    from serve_app.schemas import RecommendRequest

    uid = next(iter(users))
    encoded = retriever.encode_user(RecommendRequest(user_id=uid))
    for column, value in encoded.columns.items():
        np.testing.assert_array_equal(value[0], np.asarray(users[uid][column]), column)
    assert encoded.seen.tolist() == sorted(set(users[uid]["seen_item_index"]))


def test_raw_features_and_history_encode_exactly_like_prepare(retriever, users, demo_data):
    """A request carrying a user's raw table values and raw history reproduces its row."""
    from serve_app.schemas import RecommendRequest

    raw_users = {r["user_id"]: r for r in pads.dataset(str(demo_data / "users")).to_table()
                 .to_pylist()}
    uid = next(u for u in users if u in raw_users and len(users[u]["seen_item_index"]) > 3)
    features = {k: v for k, v in raw_users[uid].items() if k != "user_id"}
    history = [retriever.item_ids[r] for r in users[uid]["seen_item_index"]]
    encoded = retriever.encoder.encode(RecommendRequest(features=features, history=history))
    for column, value in encoded.columns.items():
        if column != "user__user_id":  # anonymous: the id feature is padding
            np.testing.assert_array_equal(value[0], np.asarray(users[uid][column]), column)
    assert encoded.columns["user__user_id"].tolist() == [0]
    # with the id too, the whole row and so the embedding are the stored user's
    full = retriever.user_embeddings([RecommendRequest(user_id=uid, features=features,
                                                       history=history)])
    stored = retriever.user_embeddings([RecommendRequest(user_id=uid)])
    np.testing.assert_allclose(full, stored, atol=1e-6)


def test_cold_start_takes_the_oov_and_padding_rows(retriever):
    from pipeline.transforms import OOV, PAD
    from serve_app.schemas import RecommendRequest

    known = retriever.item_ids[0]
    req = RecommendRequest(user_id="no-such-user", features={"country": "Atlantis"},
                           history=["no-such-item", known, 10**12], k=5)
    cols = retriever.encoder.encode(req).columns
    assert cols["user__user_id"].tolist() == [OOV]  # unknown id
    assert cols["user__country"].tolist() == [OOV]  # unseen category
    assert cols["user__gender"].tolist() == [PAD]  # not given, unknown user: null
    assert cols["user__age__missing"].tolist() == [1.0]
    history, category = cols["user__history"][0], cols["user__history__category"][0]
    # ids not in the catalogue are dropped, as prepare drops their interactions: the
    # history is the one known item, most recent last, never an OOV token
    assert history[-1] >= 2 and (history[:-1] == PAD).all() and OOV not in history
    known_category = retriever.encoder.item_features["category"][0]
    assert category[-1] == known_category and (category[:-1] == PAD).all()
    alone = retriever.encoder.encode(RecommendRequest(history=[known])).columns
    assert np.array_equal(alone["user__history"], cols["user__history"])
    answer = retriever.recommend([req])[0]
    assert len(answer.items) == 5 and known not in [i.item_id for i in answer.items]


def test_id_keys_follow_the_prepare_lookup_rule(retriever):
    """"7" finds the integer id 7 as prepare's lookup does; " 7" and full-width do not."""
    from pipeline.transforms import lookup

    item_map = retriever.encoder.item_map
    known = retriever.item_ids[5]
    assert isinstance(known, int)
    full_width = "".join(chr(0xFF10 + int(d)) for d in str(known))
    variants = [known, str(known), f" {known}", full_width, f"+{known}", "x"]
    rows = item_map.rows(variants)
    arrow = lookup(variants[1:2], item_map.index.vocab)[0] - 2  # the Arrow path, alone
    assert rows[0] == rows[1] == arrow == 5
    assert (rows[2:] == -1).all()
    assert [item_map.row(v) for v in variants] == rows.tolist()  # one at a time: the same


def test_user_embedding_equals_the_batch_jobs(batch_embeddings, demo_trained):
    """The exported tower on a stored row gives what the index build wrote for it."""
    from pipeline.config.serve import ServeConfig
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    tower_only = Retriever(demo_trained, ServeConfig(stored_user_embeddings=False))
    assert not tower_only.stored_embeddings
    uids = sample_test_users(demo_trained, 16)
    got = tower_only.user_embeddings([RecommendRequest(user_id=u) for u in uids])
    want = np.stack([batch_embeddings["users"][u] for u in uids])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_known_users_without_overrides_skip_the_tower(retriever, batch_embeddings,
                                                       demo_trained, monkeypatch):
    from serve_app.retriever import Retriever
    from serve_app.schemas import RecommendRequest

    calls = []

    def counted(users):
        calls.append(len(users))
        return Retriever.forward(retriever, users)

    monkeypatch.setattr(retriever, "forward", counted)
    uids = sample_test_users(demo_trained, 6, seed=4)
    history = [retriever.item_ids[3], retriever.item_ids[9]]
    requests = [RecommendRequest(user_id=u) for u in uids] + [
        RecommendRequest(user_id=uids[0], history=history),  # overrides: the tower runs
        RecommendRequest(user_id=uids[1], features={"age": 33}),
        RecommendRequest(user_id="someone-new")]
    got = retriever.user_embeddings(requests)
    assert calls == [3]  # one forward, for the three that are not a stored row as it is
    want = np.stack([batch_embeddings["users"][u] for u in uids])
    np.testing.assert_array_equal(got[:6], want)  # the stored vectors themselves
    assert not np.allclose(got[6], want[0], atol=1e-4)  # the new history moved it


def test_batched_answers_equal_one_by_one(retriever, demo_trained):
    from serve_app.schemas import RecommendRequest

    reqs = [RecommendRequest(user_id=u, k=3 + i % 5, exclude_seen=i % 2 == 0)
            for i, u in enumerate(sample_test_users(demo_trained, 12, seed=1))]
    together = retriever.recommend(reqs)
    for req, got in zip(reqs, together, strict=True):
        alone = retriever.recommend([req])[0]
        assert [i.item_id for i in got.items] == [i.item_id for i in alone.items]
        assert len(got.items) == req.k


def test_version_guard_refuses_an_index_of_another_model(tampered_run):
    from serve_app.retriever import Retriever

    with pytest.raises(ValueError, match="model_version='not-this-model'"):
        Retriever(tampered_run)


def test_builder_reads_the_runs_serve_config_and_overrides(demo_trained):
    from serve_app.app import app_config, deployment_options

    run_dir, cfg = app_config({"run_dir": str(demo_trained), "num_replicas": "2",
                               "max_batch_size": "8"})
    assert run_dir == demo_trained.resolve()
    assert (cfg.num_replicas, cfg.max_batch_size, cfg.max_k) == (2, 8, 1000)
    opts = deployment_options(cfg)
    assert opts["num_replicas"] == 2 and opts["ray_actor_options"] == {
        "num_cpus": 0.5, "runtime_env": {"env_vars": {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}}}
    auto = deployment_options(app_config({"run_dir": str(demo_trained),
                                          "autoscaling": "true", "max_replicas": 3})[1])
    assert "num_replicas" not in auto and auto["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ValueError, match="port"):
        app_config({"run_dir": str(demo_trained), "port": 9000})
    with pytest.raises(ValueError, match="run_dir"):
        app_config({"num_replicas": 1})


def test_http_options_carry_the_serve_configs_host_and_port():
    from ray.serve.config import HTTPOptions

    from pipeline.config.serve import ServeConfig
    from serve_app.app import NOT_OVERRIDABLE, http_options

    opts = http_options(ServeConfig(host="10.0.0.5", port=9001))
    assert opts == {"host": "10.0.0.5", "port": 9001}
    # what builder args refuse, Serve gets here; the ingress goes to Ray's environment
    assert set(opts) | {"ingress"} == set(NOT_OVERRIDABLE)
    assert (HTTPOptions(**opts).host, HTTPOptions(**opts).port) == ("10.0.0.5", 9001)


def test_ingress_modes_and_their_environment(monkeypatch, capsys):
    from jobs import environment as cli
    from serve_app import environment

    env = environment.ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert environment.ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0",
                                                "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
                                                "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                                                **environment.STARTUP_ENV}
    for mode in environment.Ingress:
        for name, value in environment.ingress_env(mode).items():
            monkeypatch.setenv(name, value)
        assert environment.current() is mode  # what a Ray started in this environment runs
    one, two = environment.isolated_env("haproxy"), environment.isolated_env("haproxy")
    ports = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
             "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC")
    assert all(one[k] != two[k] for k in ports)  # two instances share no file or port
    assert cli.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--one-machine"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "export RAY_SERVE_ENABLE_HA_PROXY=1" in printed  # the ingress, and Ray's defaults
    defaults = {**environment.RAY_DEFAULTS, **environment.ONE_MACHINE}
    assert {f'export {k}="${{{k}:-{v}}}"' for k, v in defaults.items()} <= set(printed)


def test_run_app_refuses_a_bad_override_before_starting_serve(demo_trained):
    from serve_app.app import run_app

    with pytest.raises(ValueError, match="port"):
        run_app(demo_trained, {"port": 0})
    with pytest.raises(ValueError, match=r"\['colour'\] are not accepted"):
        run_app(demo_trained, {"colour": "red"})


@pytest.fixture
def run_on_port_9123(demo_trained, demo_data, tmp_path):
    """A run whose model/meta.json holds a config with serve.host / serve.port overridden."""
    from pipeline.run_dir import META_FILE, RunDir, read_model_meta, write_json

    cfg = demo_config(demo_data, "serve.port=9123", "serve.host=0.0.0.0")
    meta = read_model_meta(RunDir(demo_trained).model).model_copy(update={"config": cfg})
    run = RunDir(tmp_path / "run")
    run.model.mkdir(parents=True)
    write_json(run.model / META_FILE, meta.model_dump(mode="json"))
    return run.root


def test_deploy_config_carries_the_runs_host_and_port(run_on_port_9123, tmp_path, capsys):
    from ray.serve.schema import ServeDeploySchema

    from jobs.deploy_config import main

    out = tmp_path / "deploy.yaml"
    assert main([str(run_on_port_9123), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "http://127.0.0.1:9123"  # 0.0.0.0, reached locally
    written = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(written)
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 9123)
    assert schema.applications[0].args == {"run_dir": str(run_on_port_9123.resolve())}
    template = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    template["http_options"].update(host="0.0.0.0", port=9123)
    template["applications"][0]["args"]["run_dir"] = str(run_on_port_9123.resolve())
    assert written == template  # nothing else of the template changes


def test_deploy_config_names_a_run_without_a_model(tmp_path, capsys):
    from jobs.deploy_config import main

    assert main([str(tmp_path)]) == 1
    assert "meta.json is missing" in capsys.readouterr().err


def test_serve_yaml_is_a_valid_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((ROOT / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (app,) = schema.applications
    assert (app.name, app.route_prefix, app.import_path) == (
        "towerline", "/", "serve_app.app:build_app")
    assert Path(app.args["run_dir"]).is_absolute()
    assert not (app.runtime_env or {}).get("working_dir")
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    assert [d.name for d in app.deployments] == ["Retrieval"]


@pytest.mark.parametrize("kind", [*CORRUPTIONS, "foreign index manifest"])
def test_each_corrupt_run_is_refused_by_the_loader_naming_the_file(kind, corrupt_runs,
                                                                    tampered_run):
    from serve_app.retriever import Retriever

    run = tampered_run if kind == "foreign index manifest" else corrupt_runs[kind]
    names = {"truncated index": "index.faiss", "missing meta key": "meta.json",
             "missing user store": "data.mdb", "stale user store": "an-older-model",
             "reordered catalogue": "items.parquet",
             "mismatched feature state": "feature state",
             "foreign index manifest": "model_version='not-this-model'"}
    with pytest.raises((ValueError, FileNotFoundError)) as err:  # typed at the edge
        Retriever(run)
    assert names[kind] in str(err.value), str(err.value)


def test_reconfigure_is_a_coroutine_so_batching_changes_on_the_event_loop():
    """Serve runs a plain `def reconfigure` in a thread pool; ours must stay on the loop."""
    import inspect

    from serve_app.app import RetrievalDeployment

    cls = RetrievalDeployment.func_or_class
    assert inspect.iscoroutinefunction(cls.reconfigure)
    source = inspect.getsource(cls.reconfigure)
    # the load goes to a worker thread; the batching settings and the swap come after it,
    # in one synchronous step on the loop
    assert "run_in_executor" in inspect.getsource(cls._load)
    assert source.index("await self._load(") < source.index("self._swap(")
    swap = inspect.getsource(cls._swap)
    assert not inspect.iscoroutinefunction(cls._swap)
    assert swap.index("_set_batching(") < swap.index("self._retriever = ")


def test_check_tool_accepts_a_good_run_and_names_every_bad_one(demo_trained, tampered_run,
                                                                corrupt_runs, capsys):
    from jobs.check import main

    assert main([str(demo_trained)]) == 0
    assert json.loads(capsys.readouterr().out)["run_dir"] == str(demo_trained.resolve())
    known = pq.read_table(demo_trained / "prepared" / "users.parquet").column(0)[0].as_py()
    assert main([str(demo_trained), "--user-id", json.dumps(known)]) == 0  # read from the store
    capsys.readouterr()
    assert main([str(demo_trained), "--user-id", "[1, 2]"]) == 1  # no such user id: refused
    assert "cannot be served" in capsys.readouterr().err
    assert main([str(tampered_run)]) == 1
    assert "model_version='not-this-model'" in capsys.readouterr().err
    for name, run in corrupt_runs.items():
        assert main([str(run)]) == 1, name
        err = capsys.readouterr().err
        assert "cannot be served" in err and "Traceback" not in err, (name, err)
