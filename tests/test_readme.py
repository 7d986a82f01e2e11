"""Every code block of the README runs as written and prints what its `# -> ...` comments say.

Blocks run in a scratch folder that links the checkout's `cogvlm/` (so the example image paths
resolve) and `.venv`, with HOME pointing there, so nothing lands in the checkout or the user's
home. The set-up lines `make chat` / `make test` / `make test-fast` are checked with `make -n`
(they exist and would run), not run: the suite itself runs inside what they build. `text`
blocks show commands that need the published weights: their flags are parsed by the real CLI.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.M | re.S)
EXPECT = re.compile(r"#\s*->\s*(.+?)\s*$")
SETUP = re.compile(r"^make (chat|test|test-fast)\b")


def blocks() -> list[tuple[str, str]]:
    return [(lang, code) for lang, code in FENCE.findall((ROOT / "README.md").read_text()) if lang in ("bash", "python")]


def expectations(code: str) -> list[str]:
    return [m.group(1) for line in code.splitlines() if (m := EXPECT.search(line))]


def params() -> list:
    cases = []
    for i, (lang, code) in enumerate(blocks()):
        slow = any(word in code for word in ("finetune", "cogvlm serve"))
        cases.append(pytest.param(lang, code, id=f"{i}-{lang}", marks=[pytest.mark.slow] if slow else []))
    return cases


def test_commands_that_need_real_weights_parse():
    """`text` blocks hold `cogvlm ...` commands for the published models: not run here (no
    download), but every flag must be one the CLI takes."""
    from cogvlm.cli import build_parser

    commands = [shlex.split(code.replace("\\\n", " ")) for lang, code in FENCE.findall((ROOT / "README.md").read_text())
                if lang == "text" and code.startswith("cogvlm ")]
    assert commands
    for argv in commands:
        build_parser().parse_args(argv[1:])


def test_the_readme_has_runnable_examples():
    assert len(blocks()) >= 5 and sum(len(expectations(code)) for _, code in blocks()) >= 8


@pytest.mark.parametrize("lang, code", params())
def test_readme_block_runs_as_written(lang, code, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "cogvlm").symlink_to(ROOT / "cogvlm")
    venv = ROOT / ".venv"
    if venv.is_dir():
        (work / ".venv").symlink_to(venv)
    env = dict(os.environ, HOME=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    lines = []
    for line in code.splitlines():
        if SETUP.match(line):
            target = SETUP.match(line).group(1)
            dry = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=60)
            assert dry.returncode == 0, f"README's `make {target}`: {dry.stderr}"
        elif line.startswith("source .venv/") and not venv.is_dir():
            continue  # the suite runs in an environment of its own; PATH above has its cogvlm
        else:
            lines.append(line)
    script = "\n".join(lines) + "\n"
    command = ["bash", "-e", "-o", "pipefail", "-c", script] if lang == "bash" else [sys.executable, "-c", script]
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        try:  # whatever the block left running (a server started with &)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert "Traceback" not in err, err
    printed = [line.strip() for line in out.splitlines()]
    at = 0
    for want in expectations(code):
        found = [i for i in range(at, len(printed)) if printed[i] == want or printed[i].startswith(want + " ")]
        assert found, f"expected a line {want!r} after line {at} of:\n{out}\n--- stderr\n{err}"
        at = found[0] + 1
