"""Fuzz the live endpoint with schemathesis: every check, no 5xx, the OpenAPI contract held.

Starts local Ray (2 CPUs) and the retrieval app behind the HAProxy ingress, as shipped, on
a free 127.0.0.1 port, then runs ``schemathesis run URL/openapi.json --checks all`` with the
settings of ``benchmarks/schemathesis.toml``: generated requests (valid ones, and invalid
ones for each field) for every operation, each answer checked for a 5xx
(``not_a_server_error``), a status the document does not list, a body or header that does
not match its schema, schema-valid data refused and schema-violating data accepted. The
per-run parts of the schema (``features`` columns, ``filter`` attributes) are the run's.

    python -m benchmarks.api_fuzz                      # >= 5,000 cases on a built demo run
    python -m benchmarks.api_fuzz --run-dir RUN        # an existing run
    python -m benchmarks.api_fuzz --cases 1000         # fewer

Then a second phase that schemathesis cannot generate (it sends standard JSON only):
``--hostile-cases`` requests (default 5,000) whose bodies hold NaN, Infinity, -Infinity,
1e999, lone surrogates (U+D800 as a JSON escape) in every field, as values and as ``features`` /
``filter`` keys, and oversized key sets (``serve.max_keys`` + 1 up to 20,000 keys); each
answer must be below 500 and, when a 4xx, strict JSON (no NaN literal, valid UTF-8).

    python -m benchmarks.api_fuzz --hostile-only       # only the second phase

Prints the number of generated cases and the failures (exit 1 when there are any);
writes ``benchmarks/results/api_fuzz.json`` (schemathesis's JSON run report and the
second phase's counts).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.record import add_record_flag, save_record

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "schemathesis.toml"
FUZZED_OPERATIONS = 4  # the POST routes; the two GETs take no input
MODES = 2  # each example count is generated twice: valid data and invalid data
COVERAGE_CASES = 250  # about what the coverage phase adds (boundary values of every field)


def fuzz(base_url: str, cases: int, report: Path, seed: int = 0, timeout_s: int = 1800
         ) -> dict:
    """Run schemathesis on ``base_url`` for about ``cases`` cases; its JSON run report.

    The run is bounded by cases (``--max-examples``), not by time: schemathesis's
    ``--max-time`` is a budget it repeats fuzzing and stateful testing to spend, so a run
    given one always lasts that long, however soon its cases are done.

    Args:
        base_url: ``http://HOST:PORT`` of a live endpoint.
        cases: the number of generated cases to reach (max-examples is set from it).
        report: where schemathesis writes its JSON report.
        seed: the generation seed (a run is reproducible with it).
        timeout_s: the run is killed (an error) past this many seconds.
    """
    # x1.5: fuzzing yields fewer cases than examples (duplicates dropped); 1,000 asked gave
    # 878 (x1.2, 500 assumed for coverage), 1,028 (x1.2, 250) and 1,142 (x1.5, 250), seed 0
    examples = math.ceil(max(cases - COVERAGE_CASES, 60) / FUZZED_OPERATIONS / MODES * 1.5)
    cmd = [str(Path(sys.executable).parent / "st"), "--config-file", str(CONFIG), "run",
           f"{base_url}/openapi.json", "--checks", "all", "--max-examples", str(examples),
           "--seed", str(seed), "--no-color",
           "--output-truncate", "true", "--report", "json", "--report-json-path",
           str(report), "--request-timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if not report.exists():
        raise RuntimeError(f"schemathesis wrote no report:\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    out = json.loads(report.read_text())
    out["console_tail"] = proc.stdout[-4000:]
    return out


def summary(report: dict) -> str:
    """One line: cases, failures by check, errors."""
    cases = report["test_cases"]
    failures = ", ".join(f"{f['title']} x{f['count']} ({', '.join(f['operations'])})"
                         for f in report["failures"]) or "none"
    return (f"{cases['generated']:,} generated cases over {report['operations']['tested']} "
            f"operations, {cases['with_failures']} with failures, {cases['errored']} "
            f"errored; failures: {failures}; {report['running_time']} s")


def record_figures(report: dict, cases: int) -> dict:
    """The record's figures: the case counts and each failure's title and count."""
    return {"cases_asked": cases, "test_cases": report["test_cases"],
            "operations_tested": report["operations"]["tested"],
            "failures": [{"title": f["title"], "count": f["count"]} for f in report["failures"]],
            "running_time_s": report["running_time"]}


# Python's json reads these; strict JSON has none of them (RFC 8259)
NON_STANDARD = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999", '"\\ud800"',
                '"\\udfff"', '"a\\ud83d"', '"\\udc80\\ud800"', '["\\ud800", NaN]')
POST_FIELDS = {"/recommend": ("user_id", "k", "history", "exclude_items", "allow_items",
                              "exclude_seen", "features", "filter"),
               "/similar-items": ("item_id", "k", "exclude_items", "allow_items", "filter"),
               "/score": ("user_id", "item_ids", "history", "features"),
               "/events": ("user_id", "item_id", "timestamp", "weight")}
KEY_COUNTS = (65, 100, 1000, 20_000)  # above serve.max_keys (64 by default), up to ~0.5 MB


def hostile_cases(columns: list[str], attributes: list[str], n: int, seed: int = 0
                  ) -> list[tuple[str, str]]:
    """``n`` (path, raw JSON text) requests with non-standard literals or too many keys.

    Args:
        columns: the run's ``features`` columns (from ``/openapi.json``).
        attributes: the run's ``filter`` attributes.
        n: the number of cases.
        seed: the generator's seed.
    """
    rng = random.Random(seed)
    out = []
    for i in range(n):
        path = rng.choice(sorted(POST_FIELDS))
        bad = rng.choice(NON_STANDARD)
        if path != "/events" and (i % 10 == 9 and path != "/similar-items"
                                  or i % 10 == 8):  # a key-count case
            part = "filter" if path == "/similar-items" or rng.random() < 0.5 and \
                path == "/recommend" else "features"
            keys = ", ".join(f'"k{j}": {rng.choice(["1", "[1]", bad])}'
                             for j in range(rng.choice(KEY_COUNTS)))
            who = '"item_id": 1' if path == "/similar-items" else '"user_id": 1'
            extra = ', "item_ids": [1]' if path == "/score" else ""
            out.append((path, f'{{{who}{extra}, "{part}": {{{keys}}}}}'))
            continue
        body = {"/recommend": {"user_id": "1"}, "/similar-items": {"item_id": "1"},
                "/score": {"user_id": "1", "item_ids": "[1]"},
                "/events": {"user_id": "1", "item_id": "1"}}[path]
        field = rng.choice(POST_FIELDS[path])
        named = {"features": columns or ["age"], "filter": attributes or ["genre"]}
        if field in named:
            key = rng.choice([*named[field], bad if bad.startswith('"') else '"\\ud800"'])
            key = key if key.startswith('"') else f'"{key}"'
            body[field] = f"{{{key}: {rng.choice([bad, f'[{bad}]', f'[1, {bad}]'])}}}"
        else:
            body[field] = rng.choice([bad, f"[{bad}]", f"[1, {bad}, 2]"])
        text = "{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}"
        out.append((path, text))
    return out


def is_strict_json(raw: bytes) -> bool:
    """Whether ``raw`` is strict JSON in UTF-8 (no NaN / Infinity literals)."""
    def refuse(literal: str) -> None:
        raise ValueError(literal)

    try:
        json.loads(raw.decode("utf-8"), parse_constant=refuse)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return False
    return True


def hostile(base_url: str, n: int, seed: int = 0) -> dict:
    """Send :func:`hostile_cases` to a live endpoint; status counts and the bad answers.

    A bad answer is a 5xx, or a 4xx whose body is not strict JSON.
    """
    import httpx

    with httpx.Client(base_url=base_url, timeout=60) as http:
        schemas = http.get("/openapi.json").json()["components"]["schemas"]
        props = schemas["RecommendRequest"]["properties"]
        columns = sorted(props.get("features", {}).get("properties", {}))
        attributes = sorted(props.get("filter", {}).get("properties", {}))
        statuses: dict[int, int] = {}
        bad: list[dict] = []
        start = time.perf_counter()
        for path, text in hostile_cases(columns, attributes, n, seed):
            answer = http.post(path, content=text.encode("utf-8", "surrogatepass"),
                               headers={"content-type": "application/json"})
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            if answer.status_code >= 500 or (answer.status_code >= 400
                                             and not is_strict_json(answer.content)):
                bad.append({"path": path, "body": text[:300], "status": answer.status_code,
                            "answer": answer.text[:300]})
    return {"cases": n, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "server_errors": sum(v for k, v in statuses.items() if k >= 500),
            "bad_answers": bad[:20], "bad_count": len(bad),
            "seconds": round(time.perf_counter() - start, 1)}


def start_ray() -> None:
    """Local Ray (2 CPUs) with the HAProxy ingress and this process's own files and ports."""
    from serve_app import environment

    environment.apply(environment.isolated_env(environment.Ingress.HAPROXY))
    os.environ.update(RAY_AUTH_MODE="disabled", SERVE_SOCKET_REUSE_PORT_ENABLED="0")
    os.environ.pop("RAY_ADDRESS", None)
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             object_store_memory=1 << 29, log_to_driver=False)


def serve_run(run_dir: Path) -> str:
    """The app behind HAProxy on a free port of this process's Ray; its base URL."""
    import httpx

    from serve_app import environment
    from serve_app.app import run_app

    port = environment.free_port()
    run_app(run_dir, {"port": port})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    return base


def main(argv: list[str] | None = None) -> int:
    """Fuzz a run's endpoint; print the count; exit 1 on any failure."""
    from benchmarks.serve_latency import DEMO_SIZES, build_run

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", help="A run directory (default: build a tiny demo run).")
    p.add_argument("--url", help="Fuzz an endpoint already running at this base URL "
                                 "(e.g. http://127.0.0.1:8000) instead of starting one.")
    p.add_argument("--cases", type=int, default=5000, help="Generated cases to reach.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hostile-cases", type=int, default=5000,
                   help="Requests with NaN / Infinity / lone surrogates / too many keys.")
    p.add_argument("--hostile-only", action="store_true",
                   help="Skip schemathesis; run only the hostile-literal phase.")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "api_fuzz.json"))
    add_record_flag(p)
    args = p.parse_args(argv)
    report: dict = {"failures": [], "test_cases": {"generated": 0, "errored": 0}}
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        if args.url:
            base = args.url.rstrip("/")
        else:
            start_ray()
            run_dir = Path(args.run_dir).resolve() if args.run_dir else \
                build_run(Path(tmp), DEMO_SIZES["tiny"], [])
            base = serve_run(run_dir)
        try:
            if not args.hostile_only:
                report = fuzz(base, args.cases, Path(tmp) / "report.json", args.seed)
            report["hostile"] = hostile(base, args.hostile_cases, args.seed)
        finally:
            if not args.url:
                from ray import serve

                serve.shutdown()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=1))
    if not args.hostile_only:
        print(summary(report))
    h = report["hostile"]
    print(f"hostile literals and key sets: {h['cases']:,} cases, statuses {h['statuses']}, "
          f"{h['server_errors']} server errors, {h['bad_count']} answers not strict JSON "
          f"({h['seconds']} s)")
    print(f"wrote {args.output}")
    figures = record_figures(report, args.cases) if not args.hostile_only else {}
    figures["hostile"] = {k: h[k] for k in ("cases", "statuses", "server_errors",
                                            "bad_count", "seconds")}
    save_record(args, "api_fuzz", figures, module="benchmarks.api_fuzz")
    ok = not report["failures"] and not report["test_cases"]["errored"] and not h["bad_count"]
    enough = args.hostile_only or report["test_cases"]["generated"] >= args.cases
    return 0 if ok and enough else 1


if __name__ == "__main__":
    sys.exit(main())
