"""Write the ``serve deploy`` YAML of one run directory, from ``configs/serve.yaml``.

    python -m jobs.deploy_config RUN_DIR [--out FILE] [--template configs/serve.yaml]
    serve deploy FILE                      # or: serve run FILE

Inputs: the template (application, deployments, proxy location) and the run's saved
``serve`` config (``RUN_DIR/model/meta.json``). Output: the template with
``applications[0].args.run_dir`` set to the absolute run directory and ``http_options``
host / port taken from the run's ``serve.host`` / ``serve.port`` (default FILE:
``RUN_DIR/serve.yaml``). Prints the endpoint's base URL (``http://HOST:PORT``) on stdout,
so a script can send its requests to the port the run configured.
"""

from __future__ import annotations

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
             f"written by python -m jobs.deploy_config from {template}\n"
    out.write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out, endpoint_url(config)
