"""Running `python -m cogvlm ...` servers for the tests: a free port, start, wait, stop."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(args: list[str], log: Path, ready: Callable[[], bool], timeout: float,
            **popen) -> Iterator[subprocess.Popen]:
    """`python -m cogvlm *args` with its output in `log`; yields the process once `ready()` is
    true, and stops it afterwards."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cogvlm", *args], stdout=out, stderr=subprocess.STDOUT,
                                **popen)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"the server died:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"the server did not come up:\n{log.read_text()}"
            if ready():
                break
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
