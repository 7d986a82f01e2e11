"""Inference-only weight formats: weight-only int8/int4 quantization with PyTorch's fused packed
kernels (the authors' `--quant 8|4`), and oneDNN-prepacked weights for CPU, in plain PyTorch.

Decoding reads every weight once per token, so storing the linear layers in 8 or 4 bits cuts
both the memory and the bytes each step reads. The kernels (`torch.ops.aten._weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA, and on CPUs with
AVX512-BF16 cogvlm's own int4 kernel on PyTorch's CPU layout, `cogvlm.kernels`) multiply by the
packed weight directly. On CUDA, long inputs (an image prefill) and every int8 call instead
dequantize the layer into one bf16 buffer per device shared by all layers and use cuBLAS (`route`;
one layer's bf16 weight of memory); the CPU always uses the packed kernels. They want bf16 activations
(int4 on CUDA accepts nothing else; on CPU int8 and int4 are 10-30x slower with fp32
activations, measured), so a quantized model runs in bf16. docs/quantization.md has the numbers.

Checkpoints hold a device-neutral layout (see `Int8Linear`, `Int4Linear`); each tensor is
packed for its device's kernel when it is loaded, so one file serves CPU and GPU.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import QuantError, UsageError
from .kernels import CpuKernels, cpu_kernels
from .model import CogVLMForCausalLM, GatedMLP


log = logging.getLogger(__name__)

# fp32 inputs with at least this many rows use MKL's GEMM on the plain weight: one threshold for
# every layer shape, chosen from whole prefills (docs/speed.md, benchmarks/prefill.py --plain-rows)
PLAIN_ROWS = 256


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

# Rows (the product of an activation's leading dims) from which a quantized layer dequantizes its
# weight into a shared bf16 buffer and multiplies with cuBLAS instead of its packed kernel, by
# (device type, bits). Estimates from PyTorch 2.13's CUDA kernels, not measured (no GPU this
# round; docs/quantization.md "GPU"):
# - int8: CUDA `_weight_int8pack_mm` runs one thread per output, each reading its weight row with
#   stride K (uncoalesced), in 16x16 blocks of which one row of threads works at batch 1: slower
#   than dequantizing (read 1 B, write 2 B per weight) plus a bf16 cuBLAS product at every row
#   count, so int8 on CUDA always dequantizes (it saves memory, not time).
# - int4: tinygemm reads the packed weight and dequantizes it again for every 16-row tile; the
#   eager dequantization here costs about 14 B of memory traffic per weight (7 reads of the bf16
#   weight), which by the same estimate pays from ~200-700 rows. 256 sends a 490 px image prefill
#   (1225+ rows) to cuBLAS and keeps decoding and short text prompts on tinygemm.
# Device types not listed (CPU) never dequantize: CPU speed is what it was.
DEQUANT_ROWS: dict[tuple[str, int], int] = {("cuda", 8): 1, ("cuda", 4): 256}
DEQUANT_CHUNK = 2**24  # int4 values dequantized per step: bounds the uint8/int8 temporaries to ~16 MB each
BACKWARD_CHUNK = 2**24  # weights dequantized at a time for a packed layer's input gradient (32 MB of bf16)


def route(device_type: str, bits: int, rows: int, compiling: bool = False) -> Literal["packed", "dequant"]:
    """Which path multiplies `rows` activation rows by a `bits`-bit weight on `device_type`.
    Compiled graphs (`--compile` compiles decoding) keep the packed kernels: inductor's weight
    freezing would fold an int4 dequantization into a full bf16 constant per layer."""
    threshold = DEQUANT_ROWS.get((device_type, bits))
    return "dequant" if threshold is not None and rows >= threshold and not compiling else "packed"


_SCRATCH: dict[torch.device, torch.Tensor] = {}


def scratch(device: torch.device, shape: tuple[int, int]) -> torch.Tensor:
    """A bf16 (N, K) view of the device's one dequantization buffer, which grows to the largest
    layer that asks: every quantized layer on the device shares it, so the dequantized path costs
    one layer's bf16 weight of memory. Safe to reuse because each layer's matmul is queued on the
    same stream before the next layer overwrites the buffer."""
    numel = shape[0] * shape[1]
    buf = _SCRATCH.get(device)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(device, None)  # free the smaller one first
        buf = _SCRATCH[device] = torch.empty(numel, dtype=torch.bfloat16, device=device)
    return buf[:numel].view(shape)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """bf16(q * scale) per output row into `out` (the exact product, rounded once)."""
    return torch.mul(qweight, scales[:, None], out=out)


@dataclass(frozen=True)
class _Run:
    """`blocks` consecutive row blocks of `height` rows from row `start`: each block's nibbles are
    its column tiles in turn, and `order` gathers a tile's nibbles back into row-major order."""

    start: int
    blocks: int
    height: int
    order: torch.Tensor


@dataclass(frozen=True)
class Int4Layout:
    """Where a packed int4 layout puts each weight, read off the packing function itself
    (`int4_layout`): rows in blocks, each block a sequence of `tile_k`-column tiles."""

    tile_k: int
    runs: tuple[_Run, ...]


def _tile_k(device_type: str, width: int) -> int:
    """Columns per tile of the device's int4 layout: CPU packs column by column (pairs make whole
    bytes); tinygemm packs 16 * inner-k-tiles columns per tile."""
    return 2 if device_type == "cpu" else 16 * _inner_k_tiles(width)


def _inner_k_tiles(width: int) -> int:
    return next(t for t in (8, 4, 2) if width % (16 * t) == 0)


def pack_int4(q: torch.Tensor, tile_k: int) -> torch.Tensor:
    """Neutral (rows, width / 2) uint8 nibbles -> the layout of the kernel on q's device."""
    if q.device.type == "cpu":  # its layout is local to blocks of 64 rows: pack block by block
        block, packed = _block(len(q), 2 * q.shape[1]), torch.empty_like(q)
        for i, b in zip(range(0, len(q), block), q.split(block)):
            packed[i:i + len(b)] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.stack([b >> 4, b & 0xF], -1).view(len(b), -1).to(torch.int32), 1)
        return packed
    return torch.ops.aten._convert_weight_to_int4pack(q.contiguous(), tile_k // 16)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """A packed tensor's 4-bit values in memory order (low nibble of each byte first), uint8."""
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack((b & 15, b >> 4), -1).view(-1)


@functools.cache
def int4_layout(device: torch.device, rows: int, tile_k: int) -> Int4Layout | None:
    """The device's packed int4 layout for `rows` output rows, derived by packing a weight whose
    values spell out their own positions (four bits per pass) and reading where each landed: the
    dequantizer then follows whatever PyTorch's packing function does, on CPU (blocks of 64, 32
    and 16 rows) and CUDA (tinygemm's 8-row tiles) alike. Two column tiles are packed, to check
    that the layout repeats tile by tile; None (with a warning) where it does not: such a layer
    keeps its packed kernel."""
    cols = 2 * tile_k
    positions = torch.arange(rows * cols, device=device)
    where = torch.zeros_like(positions)
    for shift in range(0, max(1, (rows * cols - 1).bit_length()), 4):
        digits = ((positions >> shift) & 15).to(torch.uint8).view(rows, cols)
        where |= _nibbles(pack_int4(digits[:, 0::2] << 4 | digits[:, 1::2], tile_k)).long() << shift
    layout = _runs(where.cpu().numpy(), tile_k, device)
    if layout is None:
        log.warning("this PyTorch's int4 layout on %s is not tiled as cogvlm expects; int4 layers "
                    "with %d rows keep the packed kernel at every row count", device, rows)
    return layout


def _runs(where: np.ndarray, tile_k: int, device: torch.device) -> Int4Layout | None:
    """Row blocks and tile orders from `where` (the row-major position in a (rows, 2 * tile_k)
    weight of each packed nibble), or None if it is not blocks of two equal tiles."""
    if not np.array_equal(np.sort(where), np.arange(where.size)):
        return None
    row, col = where // (2 * tile_k), where % (2 * tile_k)
    runs: list[tuple[int, int, int, np.ndarray]] = []
    j = start = 0
    while j < where.size:
        n = int(np.argmax(col[j:] >= tile_k))  # the block's first tile: columns below tile_k
        first = (row[j:j + n] - start) * tile_k + col[j:j + n]
        second = (row[j + n:j + 2 * n] - start) * tile_k + col[j + n:j + 2 * n] - tile_k
        if n == 0 or n % tile_k or not np.array_equal(np.sort(first), np.arange(n)) \
                or not np.array_equal(first, second):
            return None
        height, order = n // tile_k, np.argsort(first)
        if runs and runs[-1][2] == height and np.array_equal(runs[-1][3], order):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1, height, order)
        else:
            runs.append((start, 1, height, order))
        j, start = j + 2 * n, start + height
    return Int4Layout(tile_k, tuple(_Run(s, b, h, torch.from_numpy(o).to(device)) for s, b, h, o in runs))


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    layout: Int4Layout, out: torch.Tensor, first_row: int = 0) -> torch.Tensor:
    """bf16((q - 8) * scale + zero) of the packed rows first_row .. first_row + len(out), row-major
    into `out` (rows, Kg): the product is exact in fp32, so this is the fp32 sum rounded once to
    bf16. The range starts and ends at the layout's row blocks (`int4_row_chunks`). Row blocks go
    in chunks of ~`DEQUANT_CHUNK` values to bound the temporaries."""
    width, tile_k = out.shape[1], layout.tile_k
    stream = packed.reshape(-1).view(torch.uint8)
    scale, zero = (t.T for t in scales_and_zeros.unbind(-1))  # (N16, groups) each
    end_row = first_row + len(out)
    byte = 0
    for run in layout.runs:
        per_block = run.height * width
        step = max(1, DEQUANT_CHUNK // per_block)
        for first in range(0, run.blocks, step):
            blocks = min(step, run.blocks - first)
            lo = run.start + first * run.height
            begin, end = max(lo, first_row), min(lo + blocks * run.height, end_row)
            if begin < end:
                skip, blocks_here = (begin - lo) // run.height, (end - begin) // run.height
                b = stream[byte + skip * per_block // 2:byte + (skip + blocks_here) * per_block // 2]
                codes = torch.stack((b & 15, b >> 4), -1).sub_(8).view(torch.int8)  # q - 8, in memory order
                codes = codes.view(blocks_here, width // tile_k, -1)[:, :, run.order]
                dst = out[begin - first_row:end - first_row]
                dst.view(blocks_here, run.height, width // tile_k, tile_k).copy_(
                    codes.view(blocks_here, width // tile_k, run.height, tile_k).transpose(1, 2))
                grouped = dst.view(-1, width // group_size, group_size)
                torch.addcmul(zero[begin:end, :, None], grouped, scale[begin:end, :, None], out=grouped)
            byte += blocks * per_block // 2
    return out


def int4_row_chunks(layout: Int4Layout, width: int, max_values: int) -> list[tuple[int, int]]:
    """Row ranges (begin, end) that cover the layout in order, each whole row blocks of at most
    `max_values` weights (at least one block): what `dequantize_int4` can take one at a time."""
    chunks: list[tuple[int, int]] = []
    for run in layout.runs:
        per_chunk = max(1, max_values // (run.height * width))
        for first in range(0, run.blocks, per_chunk):
            chunks.append((run.start + first * run.height, run.start + min(run.blocks, first + per_chunk) * run.height))
    return chunks


class _QuantizedBuffers(nn.Module):
    """What the quantized layers share about moving: `.to(dtype)` / `.half()` / `.float()` leave
    every stored tensor in its dtype (the kernels take int8/uint8 weights and bf16 scales, zeros
    and biases, nothing else), and a move to another device keeps the bytes."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        for key, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self


class Int8Linear(_QuantizedBuffers):
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

    @property
    def dequantized_shape(self) -> tuple[int, int]:
        """(N, K16): what `dequantize` fills."""
        return self.out_features, self.width

    def dequantize(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The weight (or its `rows` begin..end) as bf16 (N, K16) in the device's shared buffer (`scratch`)."""
        begin, end = rows or (0, self.out_features)
        return dequantize_int8(self.qweight[begin:end], self.scales[begin:end],
                               scratch(self.qweight.device, (end - begin, self.width)))

    def row_chunks(self, max_values: int) -> list[tuple[int, int]]:
        """Row ranges of at most `max_values` weights (at least one row) covering the weight."""
        step = max(1, max_values // self.width)
        return [(i, min(i + step, self.out_features)) for i in range(0, self.out_features, step)]

    def packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """bf16 (rows, K16) activations times the weight: (rows, N), without the bias."""
        if route(x2.device.type, 8, len(x2), torch.compiler.is_compiling()) == "dequant":
            return F.linear(x2, self.dequantize())
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(self, _pad_input(x, self.width))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(_QuantizedBuffers):
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
        device = self.qweight.device
        if device.type == "cpu":
            self.kernels = cpu_kernels() if self.rows % 64 == 0 else None
        if device.type != "meta":
            self.qweight = pack_int4(self.qweight, _tile_k(device.type, self.width))

    @property
    def dequantized_shape(self) -> tuple[int, int]:
        """(N16, Kg): what `dequantize` fills."""
        return self.rows, self.width

    def dequantize(self, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """The packed weight (or its `rows` begin..end, from `row_chunks`) as bf16 (N16, Kg) in the
        device's shared buffer (`scratch`), or None where the layout could not be read (`int4_layout`)."""
        device = self.qweight.device
        layout = int4_layout(device, self.rows, _tile_k(device.type, self.width))
        if layout is None:
            return None
        begin, end = rows or (0, self.rows)
        return dequantize_int4(self.qweight, self.scales_and_zeros, self.group_size, layout,
                               scratch(device, (end - begin, self.width)), begin)

    def row_chunks(self, max_values: int) -> list[tuple[int, int]] | None:
        """Row ranges of at most `max_values` weights (at least one row block) covering the packed
        weight, or None where its layout could not be read."""
        device = self.qweight.device
        layout = int4_layout(device, self.rows, _tile_k(device.type, self.width))
        return None if layout is None else int4_row_chunks(layout, self.width, max_values)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """CPU and CUDA pack int4 in different orders, so a packed weight cannot change device type
        by a copy: refused with a QuantError (load on the target device instead). To and from
        the meta device (shapes only) and between GPUs it moves."""
        here = self.qweight.device
        there = fn(torch.empty(0, dtype=torch.uint8, device=here)).device
        if here.type != there.type and "meta" not in (here.type, there.type):
            raise QuantError(f"an int4 model packed for {here.type} cannot be moved to {there.type} with "
                             f".to(): the two kernels pack in different orders; load it with "
                             f"device={there.type!r} instead")
        return super()._apply(fn, recurse)

    def packed_mm(self, x2: torch.Tensor) -> torch.Tensor:
        """bf16 (rows, Kg) activations times the weight: (rows, N16), without the bias."""
        dequant = route(x2.device.type, 4, len(x2), torch.compiler.is_compiling()) == "dequant"
        if dequant and (w := self.dequantize()) is not None:
            return F.linear(x2, w)
        if self.qweight.device.type != "cpu":
            return torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group_size, self.scales_and_zeros)
        if kernel := self.kernels and self.kernels.int4_rows(len(x2)):
            return torch.ops.cogvlm.int4_mm(x2.contiguous(), self.qweight, self.group_size, self.scales_and_zeros,
                                            kernel == "tiles")
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_and_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = packed_linear(self, _pad_input(x, self.width))
        if self.rows != self.out_features:
            y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


QuantizedLinear = Int8Linear | Int4Linear


class _PackedMatmul(torch.autograd.Function):
    """x2 @ W.T through a packed layer's kernel, differentiable in x2 only (QLoRA).

    The packed kernels have no autograd formula, and the packed weight is frozen by design (LoRA
    trains adapters beside it), so backward gives the input its gradient, grad @ W, through the
    weight dequantized into the shared bf16 buffer and the weight none. A large layer (the output
    head: 1 GB in bf16 for CogVLM2's 128,256-entry vocabulary) is dequantized BACKWARD_CHUNK
    weights at a time and the partial products summed in fp32, so the buffer stays small. Nothing
    is saved for backward but the layer itself, so gradient checkpointing costs no extra memory
    here."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.packed_mm(x2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        layer = ctx.layer
        chunks = layer.row_chunks(BACKWARD_CHUNK)
        if chunks is None:
            raise QuantError(f"this PyTorch's int4 layout on {layer.qweight.device} cannot be read back, so "
                             f"no gradient can pass through the int4 layer: use --quant 8")
        if len(chunks) == 1:
            weight = layer.dequantize()
            return input_grad(grad.to(weight.dtype), weight), None
        total = None
        for begin, end in chunks:
            weight = layer.dequantize((begin, end))
            part = input_grad(grad[:, begin:end].to(weight.dtype), weight).float()
            total = part if total is None else total.add_(part)
        return total.to(weight.dtype), None


def input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """grad @ weight, the input's gradient of x @ weight.T for a frozen (out, in) weight, taken
    as (weight.T @ grad.T).T with grad.T made contiguous: one operand transposed, as in the
    forward product. On x86 CPUs without native bf16 (AVX2 only), PyTorch's bf16 matrix product
    of two row-major operands (the plain grad @ weight autograd takes) falls back to a kernel
    ~25x slower than this layout (measured on 2 cores, 256 x 2816 x 1024: 25 s against 1.0 s);
    on CUDA both are one cuBLAS call, and the transposed copy of grad is activation-sized."""
    rows = grad.reshape(-1, grad.shape[-1])
    return torch.mm(weight.t(), rows.t().contiguous()).t().reshape(*grad.shape[:-1], weight.shape[1])


def register_lora_layers(lora_config: object) -> None:
    """Teach a peft `LoraConfig` our packed layers, so peft (the LoRA library, for training and
    for adapters at inference alike) wraps an `Int4Linear` / `Int8Linear` as it wraps a Linear:
    its LoRA layer calls the base layer, whose forward is the packed kernel (and `_PackedMatmul`
    when training), and adds the adapter's low-rank product."""
    lora_config._register_custom_module(dict.fromkeys((Int4Linear, Int8Linear), _packed_lora_layer()))


@functools.cache
def _packed_lora_layer() -> type[nn.Module]:
    """peft's LoRA Linear over a packed base layer (built on first use: peft is optional)."""
    from peft.tuners.lora import Linear as LoraLinear

    class PackedLoraLinear(LoraLinear):
        """peft's LoRA Linear, told the packed layer's shape (peft reads it off `weight`, which
        a packed layer does not have) and refusing to merge (the delta cannot go into packed
        bytes: merge the adapter into the float checkpoint with `cogvlm merge-lora`)."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            raise QuantError("a LoRA adapter cannot be merged into quantized weights: merge it into the float "
                             "checkpoint (cogvlm merge-lora), or keep it separate (--adapter)")

    return PackedLoraLinear


def packed_linear(layer: QuantizedLinear, x2: torch.Tensor) -> torch.Tensor:
    """`layer.packed_mm(x2)`, through `_PackedMatmul` when a gradient must flow back to x2
    (training adapters above this layer); plain inference never pays for the autograd node."""
    if torch.is_grad_enabled() and x2.requires_grad:
        return _PackedMatmul.apply(x2, layer)
    return layer.packed_mm(x2)


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


def check_cuda_capability(device: torch.device, dtype: torch.dtype, quant: QuantConfig | None) -> None:
    """Refuse, before any weight is read, a load the GPU cannot run: bf16 (which every quantized
    model computes in) and tinygemm's int4 need compute capability 8.0 (A100 / RTX 30xx or newer);
    on a V100 or T4 they fail inside a kernel with a raw CUDA error."""
    if device.type != "cuda":
        return
    if quant is not None and 4 in (quant.bits, quant.vision_bits):
        needs, fix = "int4 (tinygemm)", "use --fp16 without --quant, or a newer GPU"
    elif quant is not None or dtype == torch.bfloat16:
        needs, fix = "bfloat16", ("quantized models compute in bfloat16: use --fp16 without --quant, or a newer GPU"
                                  if quant is not None else "use --fp16")
    else:
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        raise UsageError(f"{torch.cuda.get_device_name(device)} ({device}) has compute capability {major}.{minor}; "
                         f"{needs} needs 8.0 or later: {fix}")


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
