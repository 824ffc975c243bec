"""The README is the front door: short, and every shell block in it runs as written.

The blocks are read from README.md as a reader copies them: continuation lines joined,
comments dropped. Each command is either run here (the help path, the config check of
every shipped config, the docs check: offline, no data, no Ray) or named in
:data:`NEEDS` with what it needs that a test run does not have, so a command added to the
README is either run or consciously left out. The docs' relative links must resolve, and
the config of docs/getting-started.md must validate.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MAX_LINES = 220
RUNS = (r"python -m jobs\.\w+ --help", r"python -m jobs\.check_config .+",
        r"python -m jobs\.docs --check")
NEEDS = {  # a command's pattern -> what it needs that an offline test does not have
    r"bash scripts/(demo|test)\.sh": "a fresh machine and minutes: it installs and runs it all",
    r"ray (start|job submit) .+": "a Ray head of its own on the fixed ports 6379 / 8265",
    r"python -m jobs\.(make_demo_data|pipeline|convert_movielens) --(src|config|out) .+":
    "minutes of training, or MovieLens files (not redistributable); the end-to-end test "
    "chains the jobs on tiny data",
    r"eval .*jobs\.environment.*": "changes the shell's environment only",
    r"export RAY_AUTH_MODE=token && ray get-auth-token --generate": "writes the user's Ray "
    "token (~/.ray/auth_token); tests/test_ray_head.py runs the demo head with it",
    r"serve run .+": "a trained run directory and a long-lived server",
    r"curl .+": "a live endpoint",
    r"python -m jobs\.docs": "writes the pages (the --check form is run)",
}


def shell_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks of ``text``, continuations joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(" ".join(words))
    return commands


def readme_commands() -> list[str]:
    return shell_commands(README.read_text())


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES})"


def test_every_command_is_run_or_named():
    for command in readme_commands():
        runs = any(re.fullmatch(p, command) for p in RUNS)
        needs = [why for p, why in NEEDS.items() if re.fullmatch(p, command)]
        assert runs or needs, f"README command neither run by this test nor named: {command}"


def test_the_check_covers_every_shipped_config():
    checks = [c for c in readme_commands() if c.startswith("python -m jobs.check_config")]
    assert checks and any("configs/*.yaml" in c for c in checks)


@pytest.mark.parametrize("command", [c for c in readme_commands()
                                     if any(re.fullmatch(p, c) for p in RUNS)])
def test_offline_command_runs_as_written(command):
    done = subprocess.run(command.replace("python ", f"{sys.executable} ", 1), shell=True,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    if "check_config" in command:
        shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml"))
        assert [line.split(":")[0] for line in done.stdout.splitlines()] == shipped


def test_relative_links_resolve():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            path = (page.parent / target).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_getting_started_config_validates(tmp_path):
    text = (ROOT / "docs" / "getting-started.md").read_text()
    (config,) = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    (tmp_path / "mine.yaml").write_text(config)
    cfg = load_config(tmp_path / "mine.yaml")
    assert cfg.sequence.enabled and [f.name for f in cfg.features.item] == ["item_id"]
