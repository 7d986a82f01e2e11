"""cogvlm's own CPU kernels (`csrc/`), compiled for this machine at first use.

PyTorch's CPU int4 kernel spends a decode step unpacking nibbles, not reading memory (docs/
quantization.md has the measurements); `csrc/int4_cpu.cpp` multiplies the same packed weights
with AVX512-BF16 and, where the CPU has it, AMX. It is built with PyTorch's extension builder
(a C++ compiler and ninja; ~15 s, once: the result is cached in ~/.cache/torch_extensions) and
registered as `torch.ops.cogvlm.int4_mm`, which `torch.compile` treats as one opaque call. Where
it cannot run (another CPU, no compiler), int4 layers keep PyTorch's kernel.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "int4_cpu.cpp"


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
        from torch.utils.cpp_extension import load

        log.info("loading cogvlm's CPU kernels (compiled for this machine the first time, ~15 s)")
        load(name="cogvlm_cpu_kernels", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except Exception as e:  # no compiler, no ninja, not x86: the aten kernels still work
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
