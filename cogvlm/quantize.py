"""Inference-only weight formats: weight-only int8/int4 quantization with PyTorch's fused packed
kernels (the authors' `--quant 8|4`), and oneDNN-prepacked weights for CPU, in plain PyTorch.

Decoding reads every weight once per token, so storing the linear layers in 8 or 4 bits cuts
both the memory and the bytes each step reads. The kernels (`torch.ops.aten._weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA, and on CPUs with
AVX512-BF16 cogvlm's own int4 kernel on PyTorch's CPU layout, `cogvlm.kernels`) multiply by the
packed weight directly: no full-precision copy of a weight is ever made. They want bf16 activations
(int4 on CUDA accepts nothing else; on CPU int8 and int4 are 10-30x slower with fp32
activations, measured), so a quantized model runs in bf16. docs/quantization.md has the numbers.

Checkpoints hold a device-neutral layout (see `Int8Linear`, `Int4Linear`); each tensor is
packed for its device's kernel when it is loaded, so one file serves CPU and GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantError
from .kernels import CpuKernels, cpu_kernels
from .model import CogVLMForCausalLM, GatedMLP


PLAIN_ROWS = 256  # fp32 inputs with at least this many rows use MKL's GEMM on the plain weight


class PackedLinear(nn.Module):
    """A Linear whose weight is stored once, in oneDNN's blocked layout, for CPU inference.

    A plain `F.linear` on CPU repacks the whole weight on every call when a few rows come in
    (batched decoding reads each weight twice and writes it once: ~2x slower at 4-16 rows);
    packing it up front makes the per-step cost one read. For a single row (batch-1 decoding)
    in fp32, though, MKL's matrix-vector product on the plain weight beats oneDNN's packed
    kernel by 1.2-1.7x (measured per layer), and from about `PLAIN_ROWS` rows on (a prefill)
    MKL's GEMM catches up again: packed wins by 10-45% between 8 and ~200 rows, is level
    (+-5%) from ~240 rows in isolation and ~10% slower inside a one-thread text prefill. So
    fp32 also keeps the plain weight for one-row and long inputs: twice the linear weights'
    memory, bought for speed. In bf16 the packed kernel is the faster one at every row count
    (MKL has no bf16 matrix-vector product), so bf16 keeps only the packed weight.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # the row count (8) only tunes oneDNN's choice of layout; any number of rows works
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 8),
                             persistent=False)
        self.register_buffer("plain_weight", weight.detach() if weight.dtype == torch.float32 else None,
                             persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.plain_weight is not None and (rows == 1 or rows >= PLAIN_ROWS):
            return F.linear(x, self.plain_weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


class PackedGatedMLP(nn.Module):
    """The decoder's MLP with gate and up packed as one weight: one matmul instead of two,
    which is ~15% faster when a single row comes in (batch-1 decoding)."""

    def __init__(self, mlp: GatedMLP) -> None:
        super().__init__()
        self.gate_up = PackedLinear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down_proj = PackedLinear(mlp.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing helps plain fp32/bf16 inference on CPU builds that have it. Its bf16 packing
    needs AVX-512 (BW/VL/DQ) and raises without it (an AMD EPYC with AVX2 only, say): bf16 then
    stays plain."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.cpu._is_avx512_supported())


def prepack_model(model: CogVLMForCausalLM) -> CogVLMForCausalLM:
    """Replace every full-precision Linear (vision encoder, adapter, both experts, output head)
    in place; quantized layers keep their own kernels.
    Inference only: the packed weights take no gradient and are left out of `state_dict`."""
    _replace(model, GatedMLP, lambda name, mlp: isinstance(mlp.gate_proj, nn.Linear), lambda name, mlp: PackedGatedMLP(mlp))
    _replace(model, nn.Linear, lambda name, m: True, lambda name, linear: PackedLinear(linear.weight, linear.bias))
    return model


BITS = (4, 8)
GROUP_SIZES = (32, 64, 128, 256)  # what both int4 kernels accept
VISION_BITS = (8,)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _block(rows: int, width: int) -> int:
    """Rows per block (a multiple of 64) of about 1 M values: quantizing and packing block by
    block keeps the float / int32 temporaries a few MB whatever the layer (a whole 32000-row
    output head in fp32 is 0.26 GB, several times over while quantizing). 4 M-value blocks
    put the int4 load's peak at 0.42-0.47x the bf16 checkpoint, 1 M at 0.40x, and load faster
    (benchmarks/load.py)."""
    return max(64, (2**20 // width) // 64 * 64)


def _row_blocks(rows: int, width: int) -> range:
    return range(0, rows, _block(rows, width))


def _pad_input(x: torch.Tensor, width: int) -> torch.Tensor:
    """(..., K) activations as a bf16 (rows, width) matrix, zero-padded to the packed width."""
    x = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    return F.pad(x, (0, width - x.shape[1])) if width != x.shape[1] else x


class Int8Linear(nn.Module):
    """A Linear with int8 weights, one bf16 scale per output row: y = (x @ q.T) * scale + bias.

    Layout (the same in checkpoints and in memory, on every device): `qweight` int8 (N, K16),
    `scales` bf16 (N,), `bias` bf16 (N,) if any. K16 = in_features rounded up to 16 with zero
    columns: the CPU kernel gives wrong results (or crashes) for other widths (measured).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.width = _round_up(in_features, 16)
        self.register_buffer("qweight", torch.empty(out_features, self.width, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.bfloat16, device=device) if bias else None)

    @staticmethod
    def quantize(weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Symmetric per-row int8 of a float weight (N, K): {'qweight', 'scales'}, on its device.
        Each value is rounded to the nearest multiple of the stored (bf16) scale."""
        n, k = weight.shape
        qweight = torch.zeros(n, _round_up(k, 16), dtype=torch.int8, device=weight.device)
        scales = torch.empty(n, dtype=torch.bfloat16, device=weight.device)
        for i in _row_blocks(n, k):
            w = weight[i:i + _block(n, k)].detach().float()
            scales[i:i + len(w)] = (w.abs().amax(1) / 127).clamp_min(1e-8).to(torch.bfloat16)
            qweight[i:i + len(w), :k] = torch.round(w / scales[i:i + len(w)].float()[:, None]).clamp_(-128, 127)
        return {"qweight": qweight, "scales": scales}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(_pad_input(x, self.width), self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """A Linear with 4-bit weights in groups of `group_size` inputs, each group with a bf16 scale
    and zero: w = (q - 8) * scale + zero (q in 0..15), the tinygemm kernels' format; a bias
    (CogVLM2's vision-expert QKV) stays bf16.

    Checkpoint (device-neutral) layout: `qweight` uint8 (N16, Kg / 2), two values per byte, the
    even column in the high nibble; `scales_and_zeros` bf16 (Kg / group_size, N16, 2). N16 =
    out_features rounded up to 16 (the CPU kernel's block), Kg = in_features rounded up to the
    group size; padding is zeros and is sliced off / fed zeros. `pack` turns `qweight` into the
    kernel's layout for its device (same bytes, another order): CPU and CUDA layouts differ, so
    checkpoints keep the neutral one and every load packs.
    """

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if group_size not in GROUP_SIZES:
            raise QuantError(f"int4 group size must be one of {GROUP_SIZES}, not {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.width, self.rows = _round_up(in_features, group_size), _round_up(out_features, 16)
        self.register_buffer("qweight", torch.empty(self.rows, self.width // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(self.width // group_size, self.rows, 2,
                                                             dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=torch.bfloat16, device=device) if bias else None)
        self.kernels: CpuKernels | None = None  # set by `pack` on CPU: cogvlm's decode kernels, if they run here

    @staticmethod
    def quantize(weight: torch.Tensor, group_size: int = 128) -> dict[str, torch.Tensor]:
        """Asymmetric grouped int4 of a float weight (N, K), in the neutral layout, on its device:
        per group, 16 levels spread from its min to its max; each value rounded to the nearest
        level of the stored (bf16) scale and zero."""
        n, k = weight.shape
        rows, width = _round_up(n, 16), _round_up(k, group_size)
        qweight = torch.empty(rows, width // 2, dtype=torch.uint8, device=weight.device)
        scales_and_zeros = torch.empty(width // group_size, rows, 2, dtype=torch.bfloat16, device=weight.device)
        block = _block(rows, width)
        for i in _row_blocks(rows, width):
            part = weight[i:i + block].detach().float()
            w = F.pad(part, (0, width - k, 0, min(block, rows - i) - len(part))).view(-1, width // group_size, group_size)
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            scale = ((hi - lo) / 15).clamp_min(1e-8).to(torch.bfloat16).float()
            zero = (lo + 8 * scale).to(torch.bfloat16).float()
            q = torch.round((w - zero) / scale + 8).clamp_(0, 15).to(torch.uint8).view(len(w), width)
            qweight[i:i + len(w)] = q[:, 0::2] << 4 | q[:, 1::2]
            scales_and_zeros[:, i:i + len(w)] = torch.cat([scale, zero], -1).transpose(0, 1)
        return {"qweight": qweight, "scales_and_zeros": scales_and_zeros}

    def pack(self) -> None:
        """Neutral `qweight` → the layout of its device's kernel (once, when it is filled). On CPU
        the layout is PyTorch's, which cogvlm's own decode kernels also read (`kernels`)."""
        q = self.qweight
        if q.device.type == "cpu":  # its layout is local to blocks of 64 rows: pack block by block
            self.kernels = cpu_kernels() if self.rows % 64 == 0 else None
            block, packed = _block(self.rows, self.width), torch.empty_like(q)
            for i, b in zip(range(0, self.rows, block), q.split(block)):
                packed[i:i + len(b)] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    torch.stack([b >> 4, b & 0xF], -1).view(len(b), -1).to(torch.int32), 1)
            self.qweight = packed
        elif q.device.type != "meta":
            tiles = next(t for t in (8, 4, 2) if self.width % (16 * t) == 0)
            self.qweight = torch.ops.aten._convert_weight_to_int4pack(q.contiguous(), tiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _pad_input(x, self.width)
        if self.qweight.device.type != "cpu":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group_size, self.scales_and_zeros)
        elif kernel := self.kernels and self.kernels.int4_rows(len(x2)):
            y = torch.ops.cogvlm.int4_mm(x2.contiguous(), self.qweight, self.group_size, self.scales_and_zeros,
                                         kernel == "tiles")
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)
        if self.rows != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


QuantizedLinear = Int8Linear | Int4Linear


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize: decoder linears (both experts) + the output head at `bits`; the ViT and
    adapter linears at `vision_bits`. None leaves that side in full precision (the authors
    quantize only the decoder)."""

    bits: int | None
    group_size: int = 128
    vision_bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in (None, *BITS):
            raise QuantError(f"quantization bits must be 4 or 8, not {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise QuantError(f"int4 group size must be one of {GROUP_SIZES}, not {self.group_size}")
        if self.vision_bits not in (None, *VISION_BITS):
            raise QuantError(f"vision quantization supports 8 bits, not {self.vision_bits}")

    def bits_for(self, module_name: str) -> int | None:
        """The bits of the Linear named `module_name` (None: left in full precision)."""
        if module_name.startswith("model.layers.") or module_name == "lm_head":
            return self.bits
        if module_name.startswith("model.vision."):
            return self.vision_bits
        return None

    def to_dict(self) -> dict[str, int | None]:
        """The `quantization` entry of a quantized checkpoint's config.json."""
        return {"bits": self.bits, "group_size": self.group_size, "vision_bits": self.vision_bits}

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        def bits(key: str) -> int | None:
            return None if d.get(key) is None else int(d[key])

        return cls(bits("bits"), int(d.get("group_size", 128)), bits("vision_bits"))


def empty_quantized(linear: nn.Linear, bits: int, group_size: int) -> QuantizedLinear:
    """A quantized module shaped like `linear` (not yet filled), on its device."""
    device, bias = linear.weight.device, linear.bias is not None
    if bits == 8:
        return Int8Linear(linear.in_features, linear.out_features, bias, device)
    return Int4Linear(linear.in_features, linear.out_features, group_size, bias, device)


def quantize_tensors(weight: torch.Tensor, bits: int, group_size: int) -> dict[str, torch.Tensor]:
    """A float weight's quantized tensors (checkpoint layout), computed on its device."""
    return Int8Linear.quantize(weight) if bits == 8 else Int4Linear.quantize(weight, group_size)


def quantize_layout(model: CogVLMForCausalLM, quant: QuantConfig) -> CogVLMForCausalLM:
    """Swap every Linear `quant` selects for an empty quantized module, in place (on the meta
    device this is free: the loader then fills them, and `plan` counts their bytes)."""
    _replace(model, nn.Linear, lambda name, m: quant.bits_for(name) is not None,
             lambda name, m: empty_quantized(m, quant.bits_for(name), quant.group_size))
    return model


def quantize_model(model: CogVLMForCausalLM, quant: QuantConfig) -> CogVLMForCausalLM:
    """Quantize a full-precision model in place (each weight on its own device) and cast its
    other parameters to bf16, the kernels' activation dtype. Loading with `quant=` does the
    same while the weights stream in, without ever holding the full-precision model."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_layout(model, quant)
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            linear = linears[name]
            fill(module, quantize_tensors(linear.weight, quant.bits_for(name), quant.group_size), linear.bias)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def fill(module: QuantizedLinear, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
    """Give an empty quantized module its tensors (checkpoint layout) and pack them for its kernel."""
    for key, t in tensors.items():
        setattr(module, key, t)
    if bias is not None:
        module.bias = bias.detach().to(torch.bfloat16)
    if isinstance(module, Int4Linear):
        module.pack()


def _replace(model: nn.Module, kind: type[nn.Module], selected: Callable[[str, nn.Module], bool],
             make: Callable[[str, nn.Module], nn.Module]) -> None:
    """Swap each module of type `kind` that `selected(name, module)` picks for `make(name, module)`."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, kind) and selected(name, m)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, module))
