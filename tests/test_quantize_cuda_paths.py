"""The quantized layers' CUDA paths, checked on the CPU: the dequantize-and-cuBLAS path (its
routing, its exact unpacking of PyTorch's packed layouts, its output against the packed
kernel's), moving packed layers with `.to()`, the compute-capability check, the dtype check of
quantized checkpoints, and the pinned staging of a CUDA load. The CPU runs the same code with
the CUDA-only pieces (packing function, copy engine) passed in or forced."""

from __future__ import annotations

import types
from typing import Callable

import pytest
import torch

from cogvlm import quantize
from cogvlm.errors import CheckpointError, QuantError, UsageError
from cogvlm.quantize import (DEQUANT_ROWS, Int4Linear, Int8Linear, QuantConfig, check_cuda_capability,
                             dequantize_int4, dequantize_int8, empty_quantized, fill, int4_layout, quantize_tensors,
                             route)

CPU = torch.device("cpu")


def quantized(n: int, k: int, bits: int, group_size: int = 64, seed: int = 0) -> Int8Linear | Int4Linear:
    g = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(k, n)
    layer = empty_quantized(linear, bits, group_size)
    fill(layer, quantize_tensors(torch.randn(n, k, generator=g), bits, group_size), linear.bias)
    return layer


def reference_int4(tensors: dict[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """bf16((q - 8) * scale + zero), written from the neutral (checkpoint) layout: the even
    column in the high nibble. (q - 8) * scale is exact in fp32; the fp32 sum is rounded once."""
    q = tensors["qweight"]
    rows, width = q.shape[0], 2 * q.shape[1]
    nibbles = torch.stack([q >> 4, q & 15], -1).view(rows, width).float()
    scale, zero = tensors["scales_and_zeros"].float().unbind(-1)
    return ((nibbles.view(rows, -1, group_size) - 8) * scale.T[..., None] + zero.T[..., None]).view(rows, width).bfloat16()


# Shapes: rows that are whole 64-row blocks of the CPU layout and rows with 16/32-row tails
# (80, 112, 304 = 300 padded), widths padded to the group.
@pytest.mark.parametrize("n, k, group_size", [(64, 256, 32), (80, 256, 128), (112, 512, 64), (300, 688, 64),
                                              (1024, 1024, 128)])
def test_int4_dequantize_reads_the_packed_layout_bit_exactly(n, k, group_size):
    g = torch.Generator().manual_seed(n + k)
    tensors = Int4Linear.quantize(torch.randn(n, k, generator=g), group_size)
    layer = Int4Linear(k, n, group_size)
    fill(layer, dict(tensors))  # packs for the CPU kernel
    assert not torch.equal(layer.qweight, tensors["qweight"])  # another order: the test reads a real layout
    assert torch.equal(layer.dequantize(), reference_int4(tensors, group_size))


def test_int8_dequantize_is_the_product_rounded_once():
    layer = quantized(48, 100, 8)
    out = torch.empty(layer.qweight.shape, dtype=torch.bfloat16)
    want = (layer.qweight.float() * layer.scales.float()[:, None]).bfloat16()  # exact in fp32 (8 x 8 bits)
    assert torch.equal(dequantize_int8(layer.qweight, layer.scales, out), want)


def tiled_packer(tile_k: int, shuffle: bool) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A stand-in for tinygemm's packing (which needs a GPU): 8-row x `tile_k`-column tiles, each
    tile's values in a fixed scrambled order, written as int32 words. `shuffle` scrambles across
    tiles too (a layout that is not tiled), which the layout reader must refuse."""
    def pack(q: torch.Tensor, _: int) -> torch.Tensor:
        rows, width = q.shape[0], 2 * q.shape[1]
        codes = torch.stack([q >> 4, q & 15], -1).view(rows, width)
        tiles = codes.view(rows // 8, 8, width // tile_k, tile_k).transpose(1, 2).reshape(-1, 8 * tile_k)
        order = torch.randperm(8 * tile_k, generator=torch.Generator().manual_seed(5))
        stream = tiles[:, order].reshape(-1)
        if shuffle:
            stream = stream[torch.randperm(len(stream), generator=torch.Generator().manual_seed(6))]
        pairs = stream.view(-1, 2)
        return (pairs[:, 0] | pairs[:, 1] << 4).view(torch.int32).view(rows // 8, width // tile_k, -1)
    return pack


def test_the_layout_reader_follows_a_tiled_int32_layout_and_refuses_an_untiled_one(monkeypatch):
    """What `int4_layout` relies on for tinygemm: blocks of 8 rows, tiles of 16 x inner-k-tiles
    columns, nibbles scrambled inside a tile and packed in int32 words."""
    n, k, group_size, tile_k = 96, 512, 32, 128  # a tile spans four groups, as tinygemm's with 8 inner k-tiles
    tensors = Int4Linear.quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(4)), group_size)
    monkeypatch.setattr(quantize, "pack_int4", tiled_packer(tile_k, shuffle=False))
    int4_layout.cache_clear()
    layout = int4_layout(CPU, n, tile_k)
    assert layout is not None and [(r.start, r.blocks, r.height) for r in layout.runs] == [(0, 12, 8)]
    packed = quantize.pack_int4(tensors["qweight"], tile_k)
    out = torch.empty(n, k, dtype=torch.bfloat16)
    assert torch.equal(dequantize_int4(packed, tensors["scales_and_zeros"], group_size, layout, out),
                       reference_int4(tensors, group_size))
    monkeypatch.setattr(quantize, "pack_int4", tiled_packer(tile_k, shuffle=True))
    int4_layout.cache_clear()
    assert int4_layout(CPU, n, tile_k) is None
    int4_layout.cache_clear()  # the fakes' layouts must not reach other tests


def test_routing_by_device_and_rows():
    """CUDA: int8 always dequantizes (its packed kernel is slower at every row count), int4 from
    256 rows; the CPU and compiled graphs keep the packed kernels."""
    counts = (1, 16, 255, 256, 1225, 4096)
    assert [route("cuda", 4, r) for r in counts] == ["packed"] * 3 + ["dequant"] * 3
    assert [route("cuda", 8, r) for r in counts] == ["dequant"] * 6
    assert {route("cpu", bits, r) for bits in (4, 8) for r in counts} == {"packed"}
    assert {route("cuda", bits, r, compiling=True) for bits in (4, 8) for r in counts} == {"packed"}


@pytest.mark.parametrize("bits", [4, 8])
def test_layers_route_on_the_product_of_the_leading_dims_and_cpu_stays_packed(monkeypatch, bits):
    layer = quantized(64, 128, bits)
    seen, real = [], route
    monkeypatch.setattr(quantize, "route", lambda *a: seen.append(a) or real(*a))
    monkeypatch.setattr(quantize, "scratch", lambda *a: pytest.fail("the CPU dequantized"))
    layer(torch.randn(3, 700, 128))
    assert seen == [("cpu", bits, 2100, False)]


# Both paths approximate x @ W (W the dequantized weight): the packed kernel rounds its output
# once to bf16 (2^-9 relative); the dequantized path also multiplies by bf16(W), each weight off
# by at most 2^-9 relative, i.e. 2^-9 * (|x| @ |W|) on the sum, and rounds its output once. So
# they differ by at most 2^-8 |x @ W| + 2^-9 (|x| @ |W|); fp32 accumulation adds ~K * 2^-24 of
# |x| @ |W| (< 2^-13 here). The test allows 2^-7 |x @ W| + 2^-8 (|x| @ |W|), twice that.
@pytest.mark.parametrize("bits, n, k", [(4, 192, 512), (4, 300, 688), (8, 192, 512), (8, 40, 100)])
def test_dequantized_path_matches_the_packed_kernel(monkeypatch, bits, n, k):
    layer = quantized(n, k, bits, seed=bits)
    x = torch.randn(2, 150, k, generator=torch.Generator().manual_seed(7)).bfloat16()
    packed = layer(x).double()
    monkeypatch.setitem(DEQUANT_ROWS, ("cpu", bits), 1)  # force the CUDA path's code on the CPU
    monkeypatch.setattr(quantize, "_SCRATCH", {})
    dequantized = layer(x).double()
    if bits == 8:
        w = layer.qweight[:, :k].double() * layer.scales.double()[:, None]
    else:
        w = layer.dequantize()[:n, :k].double()
    exact = x.double() @ w.T + layer.bias.double()
    magnitude = x.double().abs() @ w.abs().T + layer.bias.double().abs()
    tol = 2**-7 * exact.abs() + 2**-8 * magnitude
    assert (dequantized - packed).abs().le(tol).all()
    assert (dequantized - exact).abs().le(tol).all()
    assert list(quantize._SCRATCH) == [CPU]


def test_one_scratch_buffer_per_device_sized_for_the_largest_layer(monkeypatch):
    monkeypatch.setitem(DEQUANT_ROWS, ("cpu", 4), 1)
    monkeypatch.setitem(DEQUANT_ROWS, ("cpu", 8), 1)
    monkeypatch.setattr(quantize, "_SCRATCH", {})
    small, large, int8 = quantized(64, 128, 4), quantized(256, 512, 4), quantized(128, 256, 8)
    for layer, k in ((small, 128), (large, 512), (int8, 256), (small, 128)):
        layer(torch.randn(4, k))
    (buf,) = quantize._SCRATCH.values()
    assert buf.numel() == 256 * 512 and buf.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [4, 8])
def test_to_another_dtype_keeps_the_packed_dtypes_and_the_answers(bits):
    layer = quantized(80, 256, bits)
    x = torch.randn(5, 256)
    want, dtypes = layer(x), {k: b.dtype for k, b in layer.named_buffers()}
    for convert in (lambda m: m.to(torch.float32), lambda m: m.half(), lambda m: m.to(torch.float64)):
        convert(layer)
        assert {k: b.dtype for k, b in layer.named_buffers()} == dtypes
        assert torch.equal(layer(x), want)


@pytest.mark.parametrize("bits", [4, 8])
def test_to_meta_moves_every_buffer(bits):
    layer = quantized(80, 256, bits)
    shapes = {k: (b.shape, b.dtype) for k, b in layer.named_buffers()}
    layer.to("meta")
    assert {k: (b.shape, b.dtype) for k, b in layer.named_buffers()} == shapes
    assert all(b.device.type == "meta" for b in layer.buffers())


def test_an_int4_layer_refuses_to_change_device_type():
    layer = quantized(80, 256, 4)
    to_cuda = lambda t: types.SimpleNamespace(device=torch.device("cuda"), dtype=t.dtype)  # noqa: E731 (no GPU here)
    with pytest.raises(QuantError, match=r"packed for cpu cannot be moved to cuda .*device='cuda'"):
        layer._apply(to_cuda)
    assert layer.qweight.device == CPU


@pytest.mark.parametrize("dtype, quant, needs", [(torch.bfloat16, None, "bfloat16"),
                                                 (torch.bfloat16, QuantConfig(8), "bfloat16"),
                                                 (torch.bfloat16, QuantConfig(4), "int4")])
def test_an_old_gpu_is_refused_in_one_line(monkeypatch, dtype, quant, needs):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(UsageError) as e:
        check_cuda_capability(torch.device("cuda"), dtype, quant)
    assert "\n" not in str(e.value)
    assert f"Tesla V100-SXM2-16GB (cuda) has compute capability 7.0; {needs}" in str(e.value)
    check_cuda_capability(torch.device("cuda"), torch.float16, None)  # fp16 runs there
    check_cuda_capability(CPU, dtype, quant)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    check_cuda_capability(torch.device("cuda"), dtype, quant)


def test_a_cuda_load_on_an_old_gpu_stops_before_reading_a_weight(monkeypatch, tiny_checkpoint):
    from cogvlm import checkpoint

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(checkpoint, "iter_tensors", lambda *a, **k: pytest.fail("a weight was read"))
    config = checkpoint.read_config(tiny_checkpoint)
    with pytest.raises(UsageError, match=r"^Tesla T4 \(cuda\) has compute capability 7\.5; int4"):
        checkpoint.load_weights(tiny_checkpoint, config, torch.bfloat16, "cuda", quant=QuantConfig(4, 32))


@pytest.mark.parametrize("bits, name, dtype", [
    (4, "model.layers.0.mlp.language_mlp.down_proj.scales_and_zeros", torch.float32),
    (8, "model.layers.1.self_attn.language_expert_dense.scales", torch.float16),
    (8, "lm_head.qweight", torch.uint8),
])
def test_a_quantized_tensor_in_the_wrong_dtype_is_named(tiny_checkpoint, tmp_path, bits, name, dtype):
    from safetensors.torch import load_file, save_file

    from cogvlm.checkpoint import load_model, quantize_checkpoint

    out = quantize_checkpoint(tiny_checkpoint, tmp_path / "q", QuantConfig(bits, 32))
    for shard in out.glob("*.safetensors"):
        state = load_file(str(shard))
        if name in state:
            state[name] = state[name].to(dtype)  # same shape: only the dtype is wrong
            save_file(state, str(shard))
    wanted = {"scales_and_zeros": "bfloat16", "scales": "bfloat16", "qweight": "int8"}[name.rpartition(".")[2]]
    got = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"1 quantized tensor\(s\) in the wrong dtype: {name.replace('.', '[.]')} "
                                              rf"\({got}; expected {wanted}\)$"):
        load_model(out, torch.bfloat16)


class LazyCopier:
    """A copy engine that runs its copies late, in order, and only when one is waited on (as a
    busy GPU may): a staging buffer refilled before its copy ran would deliver wrong bytes."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.issued = self.most_in_flight = self.buffers = 0

    def staging_buffer(self, nbytes: int) -> torch.Tensor:
        self.buffers += 1
        return torch.full((nbytes,), 0xAB, dtype=torch.uint8)

    def empty(self, like: torch.Tensor) -> torch.Tensor:
        return torch.full(like.shape, 7, dtype=like.dtype) if like.dtype != torch.bool else torch.empty(like.shape, dtype=torch.bool)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> types.SimpleNamespace:
        self.issued += 1
        self.queue.append((self.issued, dst, src))
        self.most_in_flight = max(self.most_in_flight, len(self.queue))
        seq = self.issued
        return types.SimpleNamespace(synchronize=lambda: self.run_until(seq), seq=seq)

    def run_until(self, seq: int) -> None:
        while self.queue and self.queue[0][0] <= seq:
            _, dst, src = self.queue.pop(0)
            dst.copy_(src)

    def hand_over(self, done: types.SimpleNamespace) -> None:
        self.run_until(done.seq)  # a stream that waits for this copy has seen the earlier ones run


def test_pinned_staging_delivers_every_tensor_bit_identical_in_order_with_bounded_copies():
    from cogvlm.checkpoint import PinnedStaging

    g = torch.Generator().manual_seed(9)
    tensors = {"big": torch.randn(1000, generator=g),  # 4000 bytes: 63 chunks of 64
               "bf16": torch.randn(33, 7, generator=g).bfloat16(),
               "int8": torch.randint(-128, 127, (50,), generator=g, dtype=torch.int8),
               "scalar": torch.tensor(3.5),
               "empty": torch.empty(0, 4),
               "mask": torch.rand(13, generator=g) > 0.5,
               "strided": torch.randn(20, 30, generator=g).T,  # not contiguous
               "last": torch.randint(0, 255, (300,), generator=g, dtype=torch.uint8)}
    read: list[str] = []

    def source():
        for name, t in tensors.items():
            read.append(name)
            yield name, t

    copier = LazyCopier()
    delivered = []
    for name, t in PinnedStaging(copier, slots=2, chunk_bytes=64).move(source()):
        # one tensor of read-ahead: the next has been read (and queued) when this one arrives
        assert read[-1] == (list(tensors)[len(delivered) + 1] if len(delivered) + 1 < len(tensors) else "last")
        assert t.dtype == tensors[name].dtype and torch.equal(t, tensors[name]), name
        delivered.append(name)
    assert delivered == list(tensors)
    assert copier.most_in_flight == 2 and copier.buffers == 2  # overlapped, never more than the two buffers
    assert copier.queue == []  # every copy ran before the staging buffers were let go
