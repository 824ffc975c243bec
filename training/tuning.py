"""Hyperparameter search on Ray Tune over the config's ``tune`` section.

A trial is a config: the base config with each sampled value written at its dotted path
(:func:`trial_config`, the same paths ``--set`` takes). Trials train with the functions
``jobs.train`` uses, driven epoch by epoch: a plain trial runs :func:`training.loop.epochs`
in its Tune actor and reports every epoch; a ray_train trial runs
:func:`training.ray_train.fit` (DDP workers) with Tune's report callback. ASHA stops the
trials that trail at a rung, on the validation metric. Trials are packed to the
cluster's CPUs. Every trial's ``RUN_DIR/prepared`` is a view of the prepared data without
the test split (:func:`validation_view`), so nothing a trial runs can read it.

Results: Tune's own files under ``RUN_DIR/tune/search/`` (one folder per trial: its
per-epoch results), each trial's run directory ``RUN_DIR/tune/trials/TRIAL/`` (its
``prepared`` link; a ray_train trial's checkpoints and model), one MLflow run per trial in
the run's MLflow store, ``RUN_DIR/tune/summary.json`` and ``RUN_DIR/best_config.yaml`` (the
best trial's whole config, which ``jobs.pipeline`` takes as it is).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Config, apply_overrides, parse_config
from pipeline.config.tune import Distribution, TrialKind
from pipeline.run_dir import RunDir, require_prepared_as, write_json

Log = Callable[[str], None]
SEARCH_NAME = "search"  # Tune's experiment folder under RUN_DIR/tune/
# A ray_train trial's own actor only drives its Ray Train run, which places the workers:
# it holds no CPU, and a sliver of memory because Tune refuses a placement without resources.
RAY_TRAIN_DRIVER = {"cpu": 0, "memory": 256 * 2**20}


def tune_dir(run: RunDir) -> Path:
    """``RUN_DIR/tune/``: the search's view, Tune's results and the summary (absolute)."""
    return run.root.resolve() / "tune"


def best_config_path(run: RunDir) -> Path:
    """``RUN_DIR/best_config.yaml``."""
    return run.root / "best_config.yaml"


def metric_name(cfg: Config) -> str:
    """The reported key the search maximises, e.g. ``val/HR@50``."""
    return f"val/{cfg.tune.metric or cfg.train.early_stopping_metric}"


def trial_config(base: Config, sample: Mapping[str, Any]) -> Config:
    """``base`` with each sampled value at its dotted path, validated as any config is."""
    overrides = [f"{path}={json.dumps(value)}" for path, value in sample.items()]
    return parse_config(apply_overrides(base.to_dict(), overrides),
                        source=f"tune trial {dict(sample)}")


def one_process(cfg: Config) -> Config:
    """The config a plain trial trains: Ray Train's global batch in one process.

    ``train.batch_size`` is per worker; one process stepping ``batch_size x num_workers``
    rows steps as the DDP run does (``tests/test_train.py`` checks it), so a plain trial's
    figures carry over to ``jobs.pipeline`` with the same config.
    """
    workers = max(1, cfg.train.num_workers)
    return trial_config(cfg, {"train.batch_size": cfg.train.batch_size * workers})


def check_space(base: Config) -> None:
    """Every choice and both ends of every range make a valid config.

    Raises:
        ValueError: naming the ``tune.space`` key, the value and what the config says.
    """
    for path, dist in base.tune.space.items():
        for value in dist.candidates():
            try:
                trial_config(base, {path: value})
            except ValueError as err:
                raise ValueError(f"tune.space {path!r} value {value!r} gives an invalid "
                                 f"config: {err}") from None


def search_space(space: Mapping[str, Distribution]) -> dict[str, Any]:
    """Ray Tune sampling objects for the configured distributions."""
    from ray import tune

    def one(d: Distribution):
        if d.kind == "choice":
            return tune.choice(list(d.choice))
        if d.kind == "int":
            return tune.randint(d.int[0], d.int[1] + 1)  # randint's upper bound is exclusive
        return getattr(tune, d.kind)(*getattr(d, d.kind))

    return {path: one(d) for path, d in space.items()}


def validation_view(run: RunDir, out: Path) -> Path:
    """A ``prepared/`` folder of links to everything in ``RUN_DIR/prepared`` but the test split.

    Returns:
        ``out``, whose ``prepared/`` trials link to as their own.
    """
    run.require_prepared()
    view = out / "prepared"
    view.mkdir(parents=True, exist_ok=True)
    test = run.split("test").name
    for entry in run.prepared.resolve().iterdir():
        link = view / entry.name
        if entry.name != test and not link.exists():
            link.symlink_to(entry, target_is_directory=entry.is_dir())
    return out


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds.

    A plain trial: ``tune.cpus_per_trial`` CPUs and, with ``train.use_gpu``, one GPU; a
    Ray Train trial: all of its workers' CPUs and GPUs.
    """
    gpu = 1.0 if cfg.train.use_gpu else 0.0
    if cfg.tune.trainer is TrialKind.PLAIN:
        return {"CPU": cfg.tune.cpus_per_trial, "GPU": gpu}
    workers = max(1, cfg.train.num_workers)
    return {"CPU": workers * cfg.train.cpus_per_worker, "GPU": workers * gpu}


def concurrency(cfg: Config, cluster: Mapping[str, float]) -> int:
    """Trials at once: ``tune.max_concurrent`` or as many as the cluster's resources hold.

    Args:
        cfg: the config (trial kind and sizes).
        cluster: the cluster's resources, e.g. ``ray.cluster_resources()``.
    """
    need = {k: v for k, v in trial_resources(cfg).items() if v > 0}
    fits = min(math.floor(cluster.get(k, 0.0) / v + 1e-9) for k, v in need.items())
    if fits < 1:
        raise ValueError(f"one trial needs {need} (tune.trainer={cfg.tune.trainer.value}) but "
                         f"the cluster has {dict(cluster)}: lower tune.cpus_per_trial or "
                         "train.num_workers / train.cpus_per_worker")
    return min(fits, cfg.tune.max_concurrent or fits)


def _trial_run_dir(view: Path) -> Path:
    """This trial's run directory, ``RUN_DIR/tune/trials/TRIAL/``, its ``prepared`` the view's.

    Not Tune's trial folder: Tune copies that folder to its storage, links followed.
    """
    from ray import tune

    run_dir = view / "trials" / tune.get_context().get_trial_name()
    run_dir.mkdir(parents=True, exist_ok=True)
    link = run_dir / "prepared"
    if not link.exists():
        link.symlink_to(view / "prepared", target_is_directory=True)
    return run_dir


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plain_trial(sample: dict, base: dict, view: str) -> None:
    """One Tune trial with the plain loop: reports every epoch's metrics to Tune."""
    import torch
    from ray import tune

    from training import checkpoint as ckpt
    from training.loop import describe, epochs, setup
    from training.tracking import Tracker

    cfg = one_process(trial_config(parse_config(base, source="tune base config"), sample))
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_trial)))
    run_dir = _trial_run_dir(Path(view))
    name = tune.get_context().get_trial_name()
    device = torch.device("cuda" if cfg.train.use_gpu else "cpu")  # Tune set its GPU
    s = setup(cfg, run_dir, device, world_size=1, rank=0)
    state, tracker = ckpt.TrainState(), Tracker(cfg, run_dir)
    for metrics, _ in epochs(s, state):
        _say(f"[{name}] {describe(metrics, cfg, state)}")
        tracker.log(metrics, step=state.epoch)
        tune.report(metrics)
    tracker.close()


def ray_train_trial(sample: dict, base: dict, view: str) -> None:
    """One Tune trial that is a whole Ray Train run; its reports reach Tune per epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from training.ray_train import fit

    cfg = trial_config(parse_config(base, source="tune base config"), sample)
    fit(cfg, _trial_run_dir(Path(view)), log=_say, callbacks=[TuneReportCallback()])


def run_search(cfg: Config, run_dir: Path, log: Log = _say) -> dict[str, Any]:
    """Search ``cfg.tune.space`` on the running Ray; writes the summary and the best config.

    Returns:
        The summary (``metric``, ``trials`` and ``best``: its trial, sample, metric, epoch).
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from training.tracking import create_experiment, tracking_uri

    if not cfg.tune.space:
        raise ValueError("the config has no tune.space: add the fields to search, e.g. "
                         "tune: {space: {train.lr: {loguniform: [1.0e-3, 1.0e-2]}}}")
    if cfg.train.refit:
        raise ValueError("train.refit trains on the validation targets, which a search scores "
                         "its trials on: tune with train.refit false (prepare again), then "
                         "refit the chosen setting")
    check_space(cfg)
    run = RunDir(run_dir)
    require_prepared_as(run, cfg)
    out = tune_dir(run)
    view = validation_view(run, out)
    base = cfg.model_copy(deep=True)
    if cfg.train.mlflow.enabled:  # every trial logs to this run's MLflow store
        uri = tracking_uri(cfg, run.root)
        base = trial_config(cfg, {"train.mlflow.tracking_uri": uri})
        create_experiment(base, run.root)
    metric, tc = metric_name(cfg), cfg.tune
    at_once = concurrency(cfg, ray.cluster_resources())
    plain = tc.trainer is TrialKind.PLAIN
    trainable = tune.with_parameters(plain_trial if plain else ray_train_trial,
                                     base=base.to_dict(), view=str(view))
    held = {k: v for k, v in trial_resources(cfg).items() if v > 0}
    log(f"[tune] {tc.num_samples} {tc.trainer.value} trials, {at_once} at a time "
        f"({held} each), ASHA on {metric} over {cfg.train.epochs} epochs; "
        f"results in {out}")
    tuner = tune.Tuner(
        tune.with_resources(trainable, {k.lower(): v for k, v in held.items()} if plain
                            else RAY_TRAIN_DRIVER),
        param_space=search_space(tc.space),
        tune_config=tune.TuneConfig(
            metric=metric, mode="max", num_samples=tc.num_samples,
            search_alg=BasicVariantGenerator(random_state=tc.seed, max_concurrent=at_once),
            scheduler=ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs,
                                    grace_period=tc.asha.grace_period,
                                    reduction_factor=tc.asha.reduction_factor),
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=SEARCH_NAME, storage_path=str(out), verbose=0,
                                  callbacks=[_progress(tc.num_samples, metric, log)]))
    summary = summarise(tuner.fit(), metric)
    write_json(out / "summary.json", summary)
    write_best_config(trial_config(cfg, summary["best"]["sample"]), run, summary)
    return summary


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def _short(sample: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in sample.items())


def _progress(total: int, metric: str, log: Log):
    """A Tune callback that logs one line per finished trial (Tune's own tables are off)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def __init__(self):
            self.best: dict[str, tuple[float, int]] = {}
            self.done = 0

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if metric in result and result[metric] > self.best.get(trial.trial_id, (-1, 0))[0]:
                self.best[trial.trial_id] = (result[metric], int(result["epoch"]))

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            value, epoch = self.best.get(trial.trial_id, (float("nan"), 0))
            epochs = int((trial.last_result or {}).get("epoch", 0))
            log(f"[tune] {self.done}/{total} {trial.trial_id}: {epochs} epochs, best {metric} "
                f"{value:.4f} at epoch {epoch} | {_short(trial.config)}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"[tune] {self.done}/{total} {trial.trial_id} FAILED: see {trial.local_path}")

    return TrialLines()


def summarise(grid, metric: str) -> dict[str, Any]:
    """Each trial's sample, epochs run and best epoch; the best trial over all epochs."""
    trials = []
    for result in grid:
        frame = result.metrics_dataframe
        row = {"trial": Path(result.path).name, "sample": dict(result.config),
               "error": None if result.error is None else str(result.error)[:500]}
        if frame is not None and metric in frame:
            top = frame[metric].idxmax()
            row.update(epochs=int(frame["epoch"].max()), best=float(frame[metric][top]),
                       best_epoch=int(frame["epoch"][top]))
        trials.append(row)
    scored = [t for t in trials if "best" in t]
    if not scored:
        raise RuntimeError(f"no trial reported {metric}; first error: "
                           f"{next((t['error'] for t in trials if t['error']), 'none')}")
    best = max(scored, key=lambda t: t["best"])
    return {"metric": metric, "trials": trials, "best": best}


def write_best_config(cfg: Config, run: RunDir, summary: dict[str, Any]) -> Path:
    """``RUN_DIR/best_config.yaml``: the best trial's whole config, with how it was found."""
    best = summary["best"]
    header = (f"# jobs.tune: best of {len(summary['trials'])} trials by {summary['metric']} "
              f"= {best['best']:.4f} (validation, epoch {best['best_epoch']}, {best['trial']})\n"
              f"# sampled: {_short(best['sample'])}\n"
              f"# train it: python -m jobs.pipeline --config {best_config_path(run)} "
              "--output-dir RUN_DIR\n")
    path = best_config_path(run)
    path.write_text(header + yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    return path
