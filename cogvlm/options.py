"""`LoadOptions`: how to load a model, as one frozen value.

Every surface loads through it: the CLI builds it once from its flags (`cogvlm.cli.flags`), the
Python API from `CogVLM.from_pretrained`'s keywords, and Ray ships it to caption replicas as it is.
The checks that involve two options (fp16 with quantization, tensor parallelism with compile, ...)
live in `__post_init__`, the one place every path goes through.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_MODEL
from .errors import UsageError
from .quantize import QuantConfig

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# Seconds a collective of a tensor-parallel call waits for the other ranks: longer than any one
# prefill or decode step takes, short enough that a failed rank is reported rather than waited for
TP_TIMEOUT = 600.0


def launched_by_torchrun() -> int | None:
    """The world size torchrun gave this process, or None when torchrun did not start it."""
    return int(os.environ["WORLD_SIZE"]) if "TORCHELASTIC_RUN_ID" in os.environ else None


@dataclass(frozen=True)
class LoadOptions:
    """Which model, on what, in which dtype, split how and quantized how.

    `dtype` None picks bf16 on CUDA or when quantized, else fp32. `quant` (4 or 8) quantizes the
    decoder's linear layers and the output head while loading, int4 in groups of `group_size`
    inputs; `quant_vision=8` does int8 for the ViT and adapter too. `tp` None means one device, or
    torchrun's world size when torchrun started the process. `prepack` None: on when it helps
    (CPU, no compile). `tp_timeout`: seconds a collective of a tensor-parallel call waits for
    the other ranks before every rank stops with `TensorParallelError` (not the idle wait
    between calls, which has no limit). `adapter`: a LoRA adapter folder (`finetune --lora`'s
    output) applied over the base, float or quantized, without merging."""

    model: str | Path = DEFAULT_MODEL
    tokenizer: str | Path | None = None
    dtype: str | torch.dtype | None = None
    device: str | torch.device | None = None
    compile: bool = False
    tp: int | None = None
    quant: int | None = None
    group_size: int = 128
    quant_vision: int | None = None
    prepack: bool | None = None
    tp_timeout: float = TP_TIMEOUT
    adapter: str | Path | None = None

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            if self.dtype not in DTYPES:
                raise UsageError(f"unknown dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
            object.__setattr__(self, "dtype", DTYPES[self.dtype])
        self.quant_config  # QuantConfig checks bits and group size (QuantError)
        if self.quantized and self.dtype not in (None, torch.bfloat16):
            raise UsageError(f"quantized models run in bf16 (the packed kernels' activation dtype), not "
                             f"{str(self.dtype).removeprefix('torch.')}: drop --fp16 (dtype=...)")
        if self.tp is not None and self.tp < 1:
            raise UsageError(f"--tp {self.tp}: the number of processes must be at least 1")
        if not self.tp_timeout > 0:
            raise UsageError(f"--tp-timeout {self.tp_timeout}: give a number of seconds above 0")
        if self.world > 1 and self.compile:
            raise UsageError("--tp does not combine with --compile yet: the ranks decode uncompiled")
        if self.adapter is not None and self.world > 1:
            raise UsageError("--adapter does not combine with --tp yet (the ranks' split layers take no adapter): "
                             "merge it first (cogvlm merge-lora BASE ADAPTER OUT) and load OUT with --tp")
        if self.adapter is not None and self.compile:
            raise UsageError("--adapter runs uncompiled: drop --compile, or merge it first (cogvlm merge-lora BASE "
                             "ADAPTER OUT) and load OUT with --compile")
        if self.compile and self.prepack:
            raise UsageError("compile=True packs the weights itself; leave prepack unset")

    @property
    def world(self) -> int:
        """How many processes the model is split over: `tp`, else torchrun's world size, else 1."""
        return self.tp or launched_by_torchrun() or 1

    @property
    def quantized(self) -> bool:
        return self.quant is not None or self.quant_vision is not None

    @property
    def quant_config(self) -> QuantConfig | None:
        """The packed layout asked for (None: float weights, or as the checkpoint stores them)."""
        return QuantConfig(self.quant, self.group_size, self.quant_vision) if self.quantized else None

    def torch_device(self) -> torch.device:
        """The device, checked: a name torch does not know, or CUDA where there is none, is the
        user's to fix."""
        try:
            device = torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError:
            raise UsageError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError("no CUDA GPU is available here; use --device cpu")
        return device
