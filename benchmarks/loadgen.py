"""HTTP load at a fixed concurrency: ``wrk`` when installed, else a raw asyncio client.

Both keep ``concurrency`` keep-alive connections busy for ``seconds`` (a closed loop: each
connection sends its next request when the last answer arrived), POST JSON bodies taken in
turn from a list, and report p50 / p99 latency, requests per second and non-2xx answers.

- ``wrk`` (Debian package ``wrk``, C, one thread): the bodies go in through a Lua script.
  Answers slower than 30 s count as errors (wrk's ``--timeout``); slower ones are latency.
- the fallback (``python -m benchmarks.loadgen``, a separate process so that it never
  shares a GIL with the caller): HTTP/1.1 over asyncio streams, requests pre-encoded, about
  3,000-5,000 req/s on one core; it reads each answer's status line and Content-Length.

    python -m benchmarks.loadgen URL BODIES.jsonl --concurrency 16 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

WRK_SCRIPT = """
local bodies = {}
for line in io.lines(os.getenv("TL_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
local headers = {["Content-Type"] = "application/json"}
request = function()
  i = i % #bodies + 1
  return wrk.format("METHOD", nil, headers, bodies[i])
end
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def tool() -> str:
    """Which load generator :func:`load` uses on this machine."""
    return "wrk" if shutil.which("wrk") else "asyncio"


def load(url: str, bodies: list[dict], concurrency: int, seconds: float,
         method: str = "POST") -> dict:
    """Keep ``concurrency`` connections sending ``bodies`` to ``url`` for ``seconds``.

    Returns:
        ``{"requests", "p50_ms", "p99_ms", "rps", "non_2xx", "errors", "tool"}``.
    """
    with tempfile.TemporaryDirectory(prefix="tl-load-") as tmp:
        path = Path(tmp) / "bodies.jsonl"
        path.write_text("\n".join(json.dumps(b) for b in bodies) + "\n")
        if tool() == "wrk":
            return _wrk(url, path, concurrency, seconds, method, Path(tmp))
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.loadgen", url, str(path), "--concurrency",
             str(concurrency), "--seconds", str(seconds), "--method", method],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
        return json.loads(out.stdout.strip().splitlines()[-1])


def _wrk(url: str, bodies: Path, concurrency: int, seconds: float, method: str,
         tmp: Path) -> dict:
    script = tmp / "bodies.lua"
    script.write_text(WRK_SCRIPT.replace("METHOD", method))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency",
         "--timeout", "30s", "-s", str(script), url], capture_output=True, text=True, check=True,
        env={"TL_BODIES": str(bodies), "PATH": "/usr/bin:/bin"}).stdout
    pct = {m[0]: float(m[1]) * _UNITS[m[2]]
           for m in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    total = int(re.search(r"(\d+) requests in", out)[1])
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       out)
    return {"requests": total, "p50_ms": round(pct["50"], 3), "p99_ms": round(pct["99"], 3),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),
            "non_2xx": int(non_2xx[1]) if non_2xx else 0,
            "errors": sum(map(int, errors.groups())) if errors else 0, "tool": "wrk"}


async def _connection(host: str, port: int, requests: list[bytes], stop: float,
                      latencies: list[float], statuses: list[int], start: int) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    i = start
    try:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - t0)
            statuses.append(status)
            i += 1
    finally:
        writer.close()


async def _asyncio_load(url: str, bodies: list[str], concurrency: int, seconds: float,
                        method: str) -> dict:
    parts = urlsplit(url)
    head = (f"{method} {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/json\r\n")
    requests = [(head + f"Content-Length: {len(b.encode())}\r\n\r\n" + b).encode()
                for b in bodies]
    latencies: list[float] = []
    statuses: list[int] = []
    start = time.perf_counter()
    stop = start + seconds
    await asyncio.gather(*(_connection(parts.hostname, parts.port, requests, stop, latencies,
                                       statuses, n * 7) for n in range(concurrency)))
    wall = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {"requests": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 3),
            "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "rps": round(len(ms) / wall, 1),
            "non_2xx": int(sum(not 200 <= s < 300 for s in statuses)), "errors": 0,
            "tool": "asyncio"}


def main(argv: list[str] | None = None) -> None:
    """Run the asyncio client and print its figures as one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url")
    p.add_argument("bodies", help="One JSON body per line.")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--method", default="POST")
    args = p.parse_args(argv)
    bodies = [line for line in Path(args.bodies).read_text().splitlines() if line.strip()]
    print(json.dumps(asyncio.run(_asyncio_load(args.url, bodies, args.concurrency,
                                               args.seconds, args.method))))


if __name__ == "__main__":
    main()
