"""The `cogvlm` entry point itself: --version, `list`."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogvlm", *args], capture_output=True, text=True, timeout=120,
                          env=env)


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout == f"cogvlm {version('cogvlm')}\n"


def fake_cached_repo(hf_home: Path, repo: str, size: int) -> None:
    """A model in the Hugging Face cache layout (blobs, refs, snapshots of symlinks)."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "blobs" / "b0").write_bytes(b"x" * size)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("c0")
    (root / "snapshots" / "c0").mkdir(parents=True)
    (root / "snapshots" / "c0" / "model.safetensors").symlink_to("../../blobs/b0")


def test_list_shows_sizes_from_the_real_configs_and_what_is_here(tmp_path):
    fake_cached_repo(tmp_path, "THUDM/cogvlm-base-224-hf", 3_000_000)
    out = run("list", env=dict(os.environ, HF_HOME=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()[1:]}
    # 17,639,685,376 parameters (spec), 2 bytes each in bf16
    assert rows["cogvlm-chat-v1.1"][1:] == ["THUDM/cogvlm-chat-hf", "17.64", "B", "35.3", "GB", "490", "chat", "-"]
    assert rows["cogvlm-base-224"][-4:] == ["base", "cached", "(3", "MB)"]
    assert rows["cogvlm-tiny"][-1] == "shipped"
    # 18,291,033,280 (docs/spec/cogagent.md section 4); both image sizes
    assert rows["cogagent-chat"][1:] == ["THUDM/cogagent-chat-hf", "18.29", "B", "36.6", "GB", "224+1120", "inst", "-"]
