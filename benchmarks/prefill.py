"""Prefill speed on CPU (batch 1): ours, with the weights as each loading mode leaves them, beside
Hugging Face transformers' LlamaForCausalLM and the authors' compute bound.

The mid-size random CogVLM of benchmarks/generate.py (language hidden 1024, 8 layers; ViT 12
layers at 224 px), loaded as `load_weights` leaves a model (weights take no gradient: torch picks
its matmul path by that). Two prompts: an image and 16 text tokens (275 positions: ViT, adapter,
both experts), and a text-only prompt of the same length, which the peer, a LlamaForCausalLM
with the same language weights (SDPA attention), runs too. Contenders:
- packed: `CogVLM.from_pretrained` on CPU (oneDNN-prepacked weights: the default);
- plain: `prepack=False`, plain `nn.Linear` weights; also what `compile=True` prefills with
  (compiling covers the decode step only).
The bound is the authors' formula for the work, 2 x parameters x tokens (each token through the
weights it uses: ViT and adapter for the patches, one expert per token, the head for the last
one), divided by this machine's GEMM rate, measured here for the dtype on a matrix of the
decoder's shape. Best of several repeats, contenders in turns (this machine is shared and noisy);
on an oversubscribed machine `--cpu-time --threads 1` times the CPU time the process used instead
of the wall clock, which the other processes barely move.

`--plain-rows N ...` times the default (packed) model's fp32 prefills with `PLAIN_ROWS` set to each N in
turn (0: never plain), and `--layers` times each fp32 linear shape of the model alone, packed (oneDNN) against plain (MKL), at the
row counts a prefill meets: the table `PLAIN_ROWS` in cogvlm/quantize.py is chosen from.

    pip install -e '.[bench]' && python benchmarks/prefill.py [--repeats 5] [--cpu-time --threads 1] [--layers | --plain-rows 128 192 256 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from generate import CONFIG, PROMPT_LEN, hf_peer, random_model

from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm import quantize
from cogvlm.quantize import PackedLinear, prepack_model


def best_times(runs: dict, repeats: int, clock) -> dict[str, float]:
    """Seconds per contender: the best of `repeats`, contenders in turns, after one untimed run each
    (first-touch allocations)."""
    best = {name: float("inf") for name in runs}
    with torch.no_grad():
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for name, fn in runs.items():
                t = clock()
                fn()
                best[name] = min(best[name], clock() - t)
    return best


def gemm_flops(dtype: torch.dtype, clock) -> float:
    """FLOP/s of one (tokens x hidden) @ (hidden x intermediate) product, the bulk of a prefill."""
    n = 1 + CONFIG.image_tokens + PROMPT_LEN
    a = torch.randn(n, CONFIG.hidden_size, dtype=dtype)
    b = torch.randn(CONFIG.hidden_size, CONFIG.intermediate_size, dtype=dtype)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / best_times({"mm": lambda: a @ b}, 9, clock)["mm"]


def linear_params(module: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def prefill_flops(model: CogVLMForCausalLM, tokens: int, patches: int) -> int:
    """2 x parameters x tokens: the ViT sees patches + CLS, the adapter the patches, every token
    one expert (the language expert's size: both experts are the same), the head the last token."""
    lang = sum(linear_params(layer.self_attn) + linear_params(layer.mlp) for layer in model.model.layers) // 2
    vision = model.model.vision
    work = lang * tokens + linear_params(model.lm_head)
    if patches:
        work += linear_params(vision.transformer) * (patches + 1) + linear_params(vision.linear_proj) * patches
    return 2 * work


LAYER_ROWS = (16, 32, 64, 96, 128, 192, 256, 384)


def linear_shapes(model: CogVLMForCausalLM) -> dict[tuple[int, int], str]:
    """Each distinct (in, out) of the model's fp32 linears as `prepack_model` leaves them (gate and up
    fused), named by the first layer that has it."""
    shapes: dict[tuple[int, int], str] = {}
    for name, m in prepack_model(model).named_modules():
        if isinstance(m, PackedLinear):
            shapes.setdefault((m.in_features, m.out_features), name.replace(".0.", ".N.").replace(".1.", ".N."))
    return shapes


def layer_table(repeats: int, clock) -> None:
    """Packed / plain time per linear shape and row count (below 1: packed is faster), and from how many
    rows on plain stays no slower (the crossover `PLAIN_ROWS` should sit at)."""
    model = random_model(torch.float32)
    print("| layer | in x out | " + " | ".join(f"{r} rows" for r in LAYER_ROWS) + " | plain from |")
    print("|---|---|" + "---|" * len(LAYER_ROWS) + "---|")
    for (n_in, n_out), name in linear_shapes(model).items():
        weight = torch.randn(n_out, n_in) * 0.02
        packed = PackedLinear(weight)
        ratios = []
        for rows in LAYER_ROWS:
            x = torch.randn(rows, n_in)
            pw = packed.weight
            best = best_times({"packed": lambda: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], ""),
                               "plain": lambda: torch.nn.functional.linear(x, weight)}, repeats, clock)
            ratios.append(best["plain"] / best["packed"])
        wins = [r for r, ratio in zip(LAYER_ROWS, ratios) if ratio > 1.0]  # rows where plain is slower
        cross = next((r for r in LAYER_ROWS if not [w for w in wins if w >= r]), None)
        print(f"| {name} | {n_in} x {n_out} | " + " | ".join(f"{q:.2f}" for q in ratios) + f" | {cross or '-'} |")


def image_and_text_prompts() -> dict[str, PromptTokens]:
    """An image with 16 text tokens, and a text-only prompt of the same length."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(3, CONFIG.vocab_size, (CONFIG.image_tokens + PROMPT_LEN,), generator=g).tolist()
    return {"image + 16 text": PromptTokens(torch.randn(3, 224, 224, generator=g), text[:PROMPT_LEN]),
            "text only": PromptTokens(None, text)}


def plain_rows_sweep(thresholds: list[int], repeats: int, clock) -> None:
    """Whole fp32 prefills of the packed model with each `PLAIN_ROWS` in turns (0: plain weights for
    single rows only)."""
    model = prepack_model(random_model(torch.float32))

    def prefill(chunk, threshold: int):
        def run() -> None:
            quantize.PLAIN_ROWS = threshold or 1 << 62
            model(chunk, model.new_cache(1, chunk.input_ids.shape[1]), last_only=True)
        return run
    print("| prompt | " + " | ".join(f"PLAIN_ROWS {t or 'off'} ms" for t in thresholds) + " |")
    print("|---|" + "---|" * len(thresholds))
    default = quantize.PLAIN_ROWS
    try:
        for label, prompt in image_and_text_prompts().items():
            chunk = layout_batch([prompt], CONFIG)
            best = best_times({t: prefill(chunk, t) for t in thresholds}, repeats, clock)
            print(f"| {label} | " + " | ".join(f"{best[t] * 1e3:.0f}" for t in thresholds) + " |")
    finally:
        quantize.PLAIN_ROWS = default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="best of this many, taken in turns (default 5)")
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time, not the wall clock")
    ap.add_argument("--layers", action="store_true", help="per-layer packed/plain table (fp32) instead of prefills")
    ap.add_argument("--plain-rows", type=int, nargs="+", metavar="N",
                    help="fp32 prefills of the packed model at each PLAIN_ROWS (0: off) instead of the contenders")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch 1, best of {args.repeats}, {'CPU' if args.cpu_time else 'wall'} time\n")
    if args.layers:
        return layer_table(args.repeats, clock)
    if args.plain_rows:
        return plain_rows_sweep(args.plain_rows, args.repeats, clock)
    print("| dtype | prompt | tokens | GEMM GFLOP/s | bound ms | packed ms (default) | plain ms (= compile's) "
          "| HF Llama ms | HF / packed | packed, % of bound | plain, % of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in ({"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes):
        plain = random_model(dtype)
        packed = prepack_model(random_model(dtype))
        peer = hf_peer(plain).requires_grad_(False)
        rate = gemm_flops(dtype, clock)
        for label, prompt in image_and_text_prompts().items():
            chunk = layout_batch([prompt], CONFIG)
            n = chunk.input_ids.shape[1]
            runs = {name: (lambda m=m: m(chunk, m.new_cache(1, n), last_only=True))
                    for name, m in (("packed", packed), ("plain", plain))}
            if prompt.pixels is None:
                ids = chunk.input_ids
                runs["hf"] = lambda: peer(ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=1)
            best = best_times(runs, args.repeats, clock)
            bound = prefill_flops(plain, n, CONFIG.vision.num_patches if prompt.pixels is not None else 0) / rate
            hf = f"{best['hf'] * 1e3:.0f}" if "hf" in best else "-"
            ratio = f"{best['hf'] / best['packed']:.2f}x" if "hf" in best else "-"
            print(f"| {str(dtype).removeprefix('torch.')} | {label} | {n} | {rate / 1e9:.0f} | {bound * 1e3:.0f} "
                  f"| {best['packed'] * 1e3:.0f} | {best['plain'] * 1e3:.0f} | {hf} | {ratio} "
                  f"| {100 * bound / best['packed']:.0f}% | {100 * bound / best['plain']:.0f}% |")


if __name__ == "__main__":
    main()
