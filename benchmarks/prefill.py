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

    pip install -e '.[bench]' && python benchmarks/prefill.py [--repeats 5] [--cpu-time --threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from generate import CONFIG, PROMPT_LEN, hf_peer, random_model

from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.quantize import prepack_model


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="best of this many, taken in turns (default 5)")
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time, not the wall clock")
    args = ap.parse_args()
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch 1, best of {args.repeats}, {'CPU' if args.cpu_time else 'wall'} time\n")
    print("| dtype | prompt | tokens | GEMM GFLOP/s | bound ms | packed ms (default) | plain ms (= compile's) "
          "| HF Llama ms | HF / packed | packed, % of bound | plain, % of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in ({"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes):
        plain = random_model(dtype)
        packed = prepack_model(random_model(dtype))
        peer = hf_peer(plain).requires_grad_(False)
        rate = gemm_flops(dtype, clock)
        g = torch.Generator().manual_seed(0)
        text = torch.randint(3, CONFIG.vocab_size, (CONFIG.image_tokens + PROMPT_LEN,), generator=g).tolist()
        prompts = {"image + 16 text": PromptTokens(torch.randn(3, 224, 224, generator=g), text[:PROMPT_LEN]),
                   "text only": PromptTokens(None, text)}
        for label, prompt in prompts.items():
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
