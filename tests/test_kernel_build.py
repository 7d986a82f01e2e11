"""Building our CPU kernels survives a build that was killed: PyTorch's lock file it leaves is
removed once no live process builds, and a build held by another process is waited for only so
long. (No compiler run here: the lock around PyTorch's builder is what is tested.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from cogvlm.errors import KernelBuildError
from cogvlm.kernels import build_lock


def test_a_stale_pytorch_lock_is_removed_before_building(tmp_path):
    (tmp_path / "lock").write_text("")  # what a build killed mid-way leaves: PyTorch waits on it forever
    with build_lock(tmp_path, wait=5):
        assert not (tmp_path / "lock").exists()


HOLD = """
import fcntl, sys, time
with open(sys.argv[1] + "/cogvlm.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    (open(sys.argv[1] + "/lock", "w")).close()  # a live build's own PyTorch lock
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_live_build_is_waited_for_then_given_up_on(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "30"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "holding\n"
        start = time.monotonic()
        with pytest.raises(KernelBuildError, match="another process has been building"):
            with build_lock(tmp_path, wait=1):
                pass
        assert 1 <= time.monotonic() - start < 10
        assert (tmp_path / "lock").exists()  # a live build's lock is left alone
    finally:
        holder.kill()
        holder.wait()
    with build_lock(tmp_path, wait=5):  # the holder died: its flock went with it
        assert not (tmp_path / "lock").exists()
