"""The candidate kernels for weight-only quantization on CPU, one linear layer at a time.

For CogVLM-17B's layer shapes (4096 x 4096 attention dense, 11008 x 4096 MLP up), the time of
one call at 1 and 8 rows: fp32 and bf16 `F.linear`, bf16 oneDNN-prepacked (what `prepack`
gives), PyTorch's packed int8 (`_weight_int8pack_mm`) and int4 (`_weight_int4pack_mm_for_cpu`)
kernels with fp32 and with bf16 activations, cogvlm's own int4 kernels on the same packed
weights (`cogvlm.kernels`: vdpbf16ps and AMX, where the CPU has them), and torchao's
`Int8WeightOnlyConfig` (torchao 0.18 has no CPU int4 layout any more: its Int4PackingFormat
lists only CUDA / NPU ones). Best of 5 runs of 20 calls each, the candidates taking turns.
Then the int4 kernels streaming 1.1 GB of weights from DRAM (`streaming_table`), against the
machine's read bandwidth.

    python benchmarks/quant_kernels.py
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.nn.functional as F

from cogvlm.kernels import cpu_kernels
from cogvlm.quantize import Int4Linear, Int8Linear, fill, quantize_tensors


def per_call_us(fns: dict, calls: int = 20, repeats: int = 5) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / calls * 1e6)
    return best


def int4_kernels(x: torch.Tensor, layer: Int4Linear) -> dict:
    """`layer`'s product with bf16 `x` by each int4 kernel that runs here: PyTorch's packed one,
    and cogvlm's own on the same weights (`cogvlm.kernels`: vdpbf16ps, AMX)."""
    args = (x, layer.qweight, layer.group_size, layer.scales_and_zeros)
    fns = {"PyTorch packed": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(*args)}
    kernels = cpu_kernels()
    if kernels is not None:
        fns["cogvlm vdpbf16ps"] = lambda: torch.ops.cogvlm.int4_mm(*args, False)
        if kernels.amx:
            fns["cogvlm AMX"] = lambda: torch.ops.cogvlm.int4_mm(*args, True)
    return fns


def candidates(w: torch.Tensor, x: torch.Tensor) -> dict:
    n, k = w.shape
    wb, xb = w.bfloat16(), x.bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(wb, 8)
    int8 = Int8Linear(k, n)
    fill(int8, quantize_tensors(w, 8, 128))
    int4 = Int4Linear(k, n, 128)
    fill(int4, quantize_tensors(w, 4, 128))
    scales_fp32, sz_fp32 = int8.scales.float(), int4.scales_and_zeros.float()
    fns = {
        "fp32 F.linear": lambda: F.linear(x, w),
        "bf16 F.linear": lambda: F.linear(xb, wb),
        "bf16 oneDNN packed": lambda: torch.ops.mkldnn._linear_pointwise(xb, packed, None, "none", [], ""),
        "int8 packed, fp32 x": lambda: torch.ops.aten._weight_int8pack_mm(x, int8.qweight, scales_fp32),
        "int8 packed, bf16 x": lambda: int8(xb),
        "int4 packed, fp32 x": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4.qweight, 128, sz_fp32),
        **{f"int4 {name}, bf16 x": fn for name, fn in int4_kernels(xb, int4).items()},
    }
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        linear = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        linear.weight.data = wb.clone()
        ao = copy.deepcopy(linear)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(ao, Int8WeightOnlyConfig())
        fns["torchao int8 weight-only, bf16 x"] = lambda: ao(xb)
    except ImportError:
        pass
    return fns


def streaming_table(layers: int = 48, rows_list: tuple[int, ...] = (1, 8, 64)) -> None:
    """The int4 kernels reading weights from DRAM, as a 17B model's decode step does: `layers`
    int4 layers of 11008 x 4096 (23 MB each, 1.1 GB in all: more than any L3) one after the
    other, GB/s of weight bytes read, beside the machine's streaming read bandwidth (the best
    of 9 two-GiB sums, as benchmarks/generate.py) measured in the same run."""
    from generate import bandwidth_gbs

    torch.manual_seed(0)
    stack = []
    for _ in range(layers):
        layer = Int4Linear(4096, 11008, 128)
        fill(layer, quantize_tensors(torch.randn(11008, 4096) * 0.02, 4, 128))
        stack.append(layer)
    nbytes = sum(m.qweight.numel() + 2 * m.scales_and_zeros.numel() for m in stack)
    bw = bandwidth_gbs()
    print(f"\nstreaming {nbytes / 1e9:.2f} GB of int4 weights per pass; machine streaming read {bw:.1f} GB/s\n")
    print("| kernel | " + " | ".join(f"{rows} row{'s' * (rows > 1)}: GB/s (% of streaming)" for rows in rows_list)
          + " |")
    print("|---" * (len(rows_list) + 1) + "|")
    results = {}
    for rows in rows_list:
        x = torch.randn(rows, 4096).bfloat16()
        per_layer = [int4_kernels(x, m) for m in stack]
        fns = {name: (lambda name=name: [calls[name]() for calls in per_layer]) for name in per_layer[0]}
        for name, us in per_call_us(fns, calls=1, repeats=5).items():
            results.setdefault(name, []).append(nbytes / (us * 1e-6) / 1e9)
    for name, rates in results.items():
        print(f"| {name} | " + " | ".join(f"{r:.1f} ({100 * r / bw:.0f}%)" for r in rates) + " |")


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; microseconds per call\n")
    torch.manual_seed(0)
    shapes = [(4096, 4096), (11008, 4096)]
    results = {}
    for n, k in shapes:
        w = torch.randn(n, k) * 0.02
        for rows in (1, 8):
            with torch.no_grad():
                results[(n, k, rows)] = per_call_us(candidates(w, torch.randn(rows, k)))
    names = list(next(iter(results.values())))
    print("| kernel | " + " | ".join(f"{n}x{k}, {rows} row{'s' * (rows > 1)}" for n, k, rows in results) + " |")
    print("|---" * (len(results) + 1) + "|")
    for name in names:
        print(f"| {name} | " + " | ".join(f"{r[name]:.0f}" for r in results.values()) + " |")
    streaming_table()


if __name__ == "__main__":
    main()
