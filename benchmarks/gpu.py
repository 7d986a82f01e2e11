"""GPU decode and prefill speed of bf16 / int8 / int4 weights, each beside its roofline.

One prepared script (well under 8 minutes on one GPU): a random model with CogVLM-17B's real
dimensions (language hidden 4096, 32 layers, visual expert in each; EVA2-CLIP-E at 490 px)
is built on the GPU, once per format (int8 / int4 quantized in place by `quantize_model`, as
`from_pretrained(..., quant=)` does while loading). For each format it prints:

- decode tok/s at batch 1, 8 and 32 (16-token text prompts, greedy, through `BatchDecoder`:
  time(prefill + 1 + N tokens) - time(prefill + 1 token), best of 3), beside the HBM roofline
  of the bytes a step really reads: the weights of `cogvlm.plan`'s decode_step (language expert,
  norms, head, one embedding row) plus the KV cache window it attends over;
- the prefill of one 490 px image with a 16-token question (ViT, adapter, 1,243 decoder
  positions), beside the larger of its weight-read time and its matmul FLOPs at the measured
  bf16 matmul peak;
- peak GPU memory (torch.cuda.max_memory_allocated) over the format's load and runs.

HBM bandwidth and matmul peak are measured in the same run (best of several). Decoding runs
eagerly (no CUDA graphs), so batch 1 also shows the per-step launch overhead.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.md]
    python benchmarks/gpu.py --tiny     # a small model on CPU: a smoke test of the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import never_ending, ours_generate  # noqa: E402  (the same as the CPU benchmark)

from cogvlm.config import CogVLMConfig  # noqa: E402
from tests.configs import tiny_test_config  # noqa: E402
from cogvlm.model import DECODE_WINDOW, CogVLMForCausalLM  # noqa: E402
from cogvlm.plan import kv_cache_bytes, weight_bytes  # noqa: E402
from cogvlm.prompt import PromptTokens, layout_batch  # noqa: E402
from cogvlm.quantize import QuantConfig, quantize_model  # noqa: E402

REAL = never_ending(CogVLMConfig())  # cogvlm-chat-v1.1's dims
TINY = never_ending(tiny_test_config(vocab_size=512))
PROMPT_LEN = 16


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def hbm_bandwidth(device: torch.device, gib: float) -> float:
    """Bytes/s: the best of 9 streaming reads (a sum) of a buffer far larger than the caches."""
    buf = torch.ones(int(gib * 2**28), device=device)
    buf.sum()
    return buf.numel() * 4 / best_time(lambda: buf.sum(), device, 9)


def matmul_peak(device: torch.device, n: int) -> float:
    """FLOP/s of a large bf16 (fp32 on CPU) matmul, the best of 5."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / best_time(lambda: a @ b, device, 5)


def random_model(config: CogVLMConfig, device: torch.device, dtype: torch.dtype) -> CogVLMForCausalLM:
    """Built straight on `device` in `dtype` (no full-precision copy), random weights of LLaMA-like
    scale, the same for every format (seeded)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = CogVLMForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if p.ndim == 1 and "norm" in name else p.normal_(0, 0.02)
    model.inv_freq = CogVLMForCausalLM.rope_inv_freq(config).to(device)
    return model.eval().requires_grad_(False)


def human(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def prefill_flops(config: CogVLMConfig, text: int) -> float:
    """Matmul FLOPs of one image + `text` tokens: 2 x weights x tokens per part, + attention."""
    v = config.vision
    patches, h = v.num_patches, config.hidden_size
    vit = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    adapter = v.hidden_size * h + 3 * h * config.intermediate_size
    expert = 4 * h * h + 3 * h * config.intermediate_size
    seq = 1 + patches + 2 + text
    attn = 4 * v.num_layers * (patches + 1) ** 2 * v.hidden_size + 4 * config.num_layers * seq**2 * h
    return 2 * (vit * (patches + 1) + adapter * patches + config.num_layers * expert * seq + h * config.vocab_size) + attn


def run_format(name: str, bits: int | None, config: CogVLMConfig, device: torch.device, bw: float, peak: float,
               new_tokens: int, batches: tuple[int, ...]) -> list[str]:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = random_model(config, device, torch.bfloat16)
    if bits is not None:
        quantize_model(model, QuantConfig(bits))
    weights = weight_bytes(config, torch.bfloat16, bits)
    rows = []
    for batch in batches:
        ids = torch.randint(3, config.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
        ours_generate(model, ids, 2)  # warm-up: kernels, allocator
        t_one = best_time(lambda: ours_generate(model, ids, 1), device)
        t_all = best_time(lambda: ours_generate(model, ids, new_tokens + 1), device)
        rate = batch * new_tokens / (t_all - t_one)
        # the cache window a step attends over, averaged over the decode (see model.DECODE_WINDOW)
        length = 1 + PROMPT_LEN + new_tokens // 2
        window = min(-(-(length + 1) // DECODE_WINDOW) * DECODE_WINDOW, 1 + PROMPT_LEN + new_tokens + 1)
        step = weights["decode_step"] + kv_cache_bytes(config, batch, window)
        roof = batch * bw / step
        rows.append(f"| {name} | decode batch {batch} | {rate:.1f} tok/s | {roof:.0f} tok/s | {100 * rate / roof:.0f}% "
                    f"| {human(step)} per step |")
    size = config.vision.image_size
    chunk = layout_batch([PromptTokens(torch.randn(3, size, size), list(range(10, 10 + PROMPT_LEN)))], config)
    with torch.no_grad():
        def prefill() -> None:
            model(chunk, model.new_cache(1, chunk.input_ids.shape[1]), last_only=True)

        prefill()
        seconds = best_time(prefill, device)
    bound = max(weights["total"] / bw, prefill_flops(config, PROMPT_LEN) / peak)
    rows.append(f"| {name} | prefill 1 image ({chunk.input_ids.shape[1]} positions) | {seconds * 1e3:.1f} ms "
                f"| {bound * 1e3:.1f} ms | {100 * bound / seconds:.0f}% | {human(weights['total'])} weights |")
    if device.type == "cuda":
        rows.append(f"| {name} | peak GPU memory | {human(torch.cuda.max_memory_allocated(device))} "
                    f"| | | {human(weights['total'])} weights |")
    del model
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a tiny model (on CPU unless CUDA is there): smoke test")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--formats", nargs="+", choices=("bf16", "int8", "int4"), default=["bf16", "int8", "int4"])
    ap.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        ap.error("no CUDA GPU here: run with --tiny for a CPU smoke test")
    config = TINY if args.tiny else REAL
    started = time.perf_counter()
    bw = hbm_bandwidth(device, 0.25 if args.tiny else 8)
    peak = matmul_peak(device, 1024 if args.tiny else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"{name}, torch {torch.__version__}: read bandwidth {bw / 1e9:.0f} GB/s, matmul peak "
             f"{peak / 1e12:.1f} TFLOP/s (both measured); {'tiny' if args.tiny else 'CogVLM-17B'} dims, "
             f"{args.new_tokens} new tokens", "",
             "| weights | what | measured | roofline | % of roofline | bytes |", "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    bits = {"bf16": None, "int8": 8, "int4": 4}
    for fmt in args.formats:
        rows = run_format(fmt, bits[fmt], config, device, bw, peak, args.new_tokens, (1, 8, 32))
        print("\n".join(rows), flush=True)
        lines += rows
    lines.append(f"\n({time.perf_counter() - started:.0f} s in all)")
    print(lines[-1])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
