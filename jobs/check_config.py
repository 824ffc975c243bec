r"""Check configs: YAML files -> each validated, one line per file, before anything runs.

Inputs: experiment configs (``configs/demo.yaml``: validated by :mod:`pipeline.config`, the
same models every job loads, with ``--set`` overrides applied) and ``serve deploy`` configs
(a mapping with ``applications``, as ``configs/serve.yaml``: validated by Ray Serve's
``ServeDeploySchema``). Outputs: ``FILE: ok (...)`` per file on stdout; an invalid file
prints ``error: ...`` naming each bad key and what is accepted, and the exit code is 2.
Reads no data and starts no Ray, so it runs anywhere; on a cluster, as a job:

    python -m jobs.check_config configs/demo.yaml
    python -m jobs.check_config configs/*.yaml
    python -m jobs.check_config configs/ml100k.yaml --set train.epochs=2
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.check_config configs/large.yaml --set data.root=s3://BUCKET/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from jobs.cli import doc_parser
from pipeline.config import Config, load_config


def describe(cfg: Config) -> str:
    """What the config will train, in a few words."""
    mode = (f"sequence mode {cfg.sequence.objective.value}" if cfg.sequence.enabled
            else "interaction mode")
    workers = cfg.train.num_workers
    where = f"on {workers} Ray Train worker(s)" if workers else "in the job's process"
    epochs = (f"{cfg.train.epochs} epochs on training + validation (refit)" if cfg.train.refit
              else f"up to {cfg.train.epochs} epochs")
    return (f"{mode}, {len(cfg.features.user)} user / {len(cfg.features.item)} item "
            f"features, {cfg.model.user.type.value} user tower, {epochs} {where}")


def check(path: Path, overrides: list[str]) -> str:
    """One file's ``ok`` line; raises ValueError naming what is wrong."""
    with open(path, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    if isinstance(raw, dict) and "applications" in raw:
        from pydantic import ValidationError
        from ray.serve.schema import ServeDeploySchema

        try:
            schema = ServeDeploySchema.model_validate(raw)
        except ValidationError as err:
            raise ValueError(f"{path}: invalid serve deploy config: {err}") from None
        return f"ok (serve deploy config: {len(schema.applications)} application(s))"
    return f"ok ({describe(load_config(path, overrides))})"


def main(argv: list[str] | None = None) -> None:
    """Parse flags and check every file; exit 2 when any is invalid."""
    p = doc_parser(__doc__)
    p.add_argument("configs", nargs="+", metavar="FILE",
                   help="YAML files to check, e.g. configs/demo.yaml.")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="Override a field of every experiment config "
                   "before checking (repeatable), e.g. --set train.epochs=2.")
    args = p.parse_args(argv)
    failed = 0
    for name in args.configs:
        try:
            print(f"{name}: {check(Path(name), args.overrides)}")
        except (ValueError, FileNotFoundError, yaml.YAMLError) as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    raise SystemExit(2 if failed else 0)


if __name__ == "__main__":
    main()
