"""Write the ``serve deploy`` YAML of one run directory, from ``configs/serve.yaml``.

    python -m serve_app.deploy_config RUN_DIR [--out FILE] [--template configs/serve.yaml]
    serve deploy FILE                      # or: serve run FILE

Inputs: the template (application, deployments, proxy location) and the run's saved
``serve`` config (``RUN_DIR/model/meta.json``). Output: the template with
``applications[0].args.run_dir`` set to the absolute run directory and ``http_options``
host / port taken from the run's ``serve.host`` / ``serve.port`` (default FILE:
``RUN_DIR/serve.yaml``). Prints the endpoint's base URL (``http://HOST:PORT``) on stdout,
so a script can send its requests to the port the run configured.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from ray.serve.schema import ServeDeploySchema

from pipeline.run_dir import RunDir, read_model_meta
from serve_app.app import http_options

TEMPLATE = Path(__file__).resolve().parents[1] / "configs" / "serve.yaml"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # bound on every interface: reach it locally


def deploy_config(run_dir: str | Path, template: str | Path = TEMPLATE) -> dict[str, Any]:
    """The deploy config of ``run_dir``: ``template`` with its run_dir and HTTP options.

    Raises:
        FileNotFoundError: ``RUN_DIR/model/meta.json`` or the template is missing.
        ValueError: the template has no application, or the result is not a valid
            ``serve deploy`` config (pydantic's error names the field).
    """
    run = RunDir(Path(run_dir).resolve())
    serve_cfg = read_model_meta(run.model).config.serve
    raw = yaml.safe_load(Path(template).read_text(encoding="utf-8")) or {}
    if not raw.get("applications"):
        raise ValueError(f"{template}: `applications` is empty; expected one application "
                         "with import_path serve_app.app:build_app")
    app = raw["applications"][0]
    app["args"] = {**(app.get("args") or {}), "run_dir": str(run.root)}
    raw["http_options"] = {**(raw.get("http_options") or {}), **http_options(serve_cfg)}
    ServeDeploySchema.model_validate(raw)
    return raw


def endpoint_url(config: dict[str, Any]) -> str:
    """``http://HOST:PORT`` of a deploy config, as a client on the same machine reaches it."""
    host, port = config["http_options"]["host"], config["http_options"]["port"]
    return f"http://{'127.0.0.1' if host in WILDCARD_HOSTS else host}:{port}"


def write_deploy_config(run_dir: str | Path, out: str | Path | None = None,
                        template: str | Path = TEMPLATE) -> tuple[Path, str]:
    """Write ``run_dir``'s deploy config to ``out`` (default ``RUN_DIR/serve.yaml``).

    Returns:
        (the file written, the endpoint's base URL).
    """
    config = deploy_config(run_dir, template)
    out = Path(out or Path(run_dir) / "serve.yaml")
    header = f"# serve deploy config of {config['applications'][0]['args']['run_dir']}, " \
             f"written by python -m serve_app.deploy_config from {template}\n"
    out.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out, endpoint_url(config)


def main(argv: list[str] | None = None) -> int:
    """Write the YAML, print the endpoint URL (exit 0), or the error (exit 1)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="Run directory with model/, index/ and prepared/.")
    parser.add_argument("--out", help="Where to write the YAML (default RUN_DIR/serve.yaml).")
    parser.add_argument("--template", default=str(TEMPLATE), help="The deploy YAML to fill.")
    args = parser.parse_args(argv)
    try:
        out, url = write_deploy_config(args.run_dir, args.out, args.template)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: no deploy config for {args.run_dir}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}", file=sys.stderr)
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
