"""The towers package never loads ray (directly or through pipeline)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("losses", "topk", "metrics", "negatives", "distributed")

CHECK = """
import sys
for name in sys.argv[1:]:
    __import__(name)
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
assert not loaded, f"importing towers loaded {loaded[:5]}"
print("ok", len(sys.argv) - 1)
"""


def test_importing_towers_leaves_ray_out():
    modules = ["towers", "towers.model", "towers.features", "towers.bodies", "towers.export"]
    modules += [f"towers.{m}" for m in OPTIONAL if (ROOT / "towers" / f"{m}.py").exists()]
    done = subprocess.run([sys.executable, "-c", CHECK, *modules], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {len(modules)}"
