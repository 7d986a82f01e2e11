"""cogvlm's own CPU kernels (`csrc/`), compiled for this machine at first use.

PyTorch's CPU int4 kernel spends a decode step unpacking nibbles, not reading memory (docs/
quantization.md has the measurements); `csrc/int4_cpu.cpp` multiplies the same packed weights
with AVX512-BF16 and, where the CPU has it, AMX. It is built with PyTorch's extension builder
(a C++ compiler and ninja; ~15 s, once: the result is cached in ~/.cache/torch_extensions) and
registered as `torch.ops.cogvlm.int4_mm`, which `torch.compile` treats as one opaque call. Where
it cannot run (another CPU, no compiler), int4 layers keep PyTorch's kernel.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .errors import KernelBuildError

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int4_cpu.cpp"
NAME = "cogvlm_cpu_kernels"
BUILD_WAIT = 600.0  # seconds to wait for another process's build (a first build takes ~15 s)


@contextmanager
def build_lock(folder: Path, wait: float = BUILD_WAIT) -> Iterator[None]:
    """Hold this build folder while PyTorch's builder runs in it. PyTorch's own lock is a file
    that a killed build leaves behind, and every later build then waits for it forever; ours is
    an flock, which the kernel releases when its holder dies. So while we hold ours no live
    cogvlm process is building, and a PyTorch lock file found then is stale: it is removed."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cogvlm.lock", "w") as lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise KernelBuildError(f"another process has been building cogvlm's CPU kernels in {folder} for over "
                                    f"{wait:.0f} s") from None
                time.sleep(0.2)
        stale = folder / "lock"
        if stale.exists():
            log.warning("removing %s, left by a kernel build that was killed", stale)
            stale.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class CpuKernels:
    """What the compiled kernels can use on this machine."""

    amx: bool

    def int4_rows(self, rows: int) -> str | None:
        """Which kernel multiplies `rows` activation rows best ("dot", "tiles"), or None for
        PyTorch's. Measured (docs/quantization.md): vdpbf16ps leads at one row, AMX from two
        rows on (a prefill too, 5-10x PyTorch's kernel); without AMX, vdpbf16ps falls behind
        PyTorch's kernel from about four rows."""
        if rows == 1:
            return "dot"
        if self.amx:
            return "tiles"
        return "dot" if rows == 2 else None


@functools.cache
def cpu_kernels() -> CpuKernels | None:
    """Build (first time on this machine) and load the kernels; None where they cannot run.
    COGVLM_CPU_KERNELS=0 turns them off (PyTorch's kernels only)."""
    if os.environ.get("COGVLM_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine() not in ("x86_64", "AMD64") or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None  # the kernels are AVX-512 code: not worth a build that could not run
    try:
        from torch.utils.cpp_extension import _get_build_directory, load

        log.info("loading cogvlm's CPU kernels (compiled for this machine the first time, ~15 s)")
        with build_lock(Path(_get_build_directory(NAME, verbose=False))):
            load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                 is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a build that never ends: the aten kernels still work
        log.warning("cogvlm's CPU kernels could not be built (%s); int4 uses PyTorch's kernel", str(e).splitlines()[0])
        return None
    avx512_bf16, amx = torch.ops.cogvlm.cpu_kernels()
    if not avx512_bf16:
        return None
    torch.library.register_fake("cogvlm::int4_mm")(_int4_mm_shape)
    return CpuKernels(amx=bool(amx))


def _int4_mm_shape(x: torch.Tensor, w: torch.Tensor, group: int, scales_and_zeros: torch.Tensor,
                   tiles: bool) -> torch.Tensor:
    return x.new_empty(x.shape[0], scales_and_zeros.shape[1])
