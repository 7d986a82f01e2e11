"""GPU speed and memory of CogVLM in bf16 / int4 / int8, eager and compiled, each beside its roofline.

One prepared script for one GPU, meant to finish within 8 minutes on an H100 (a time budget,
`--budget`, skips what would not fit and says so in the table). Random weights with the real
layer shapes, but fewer layers, so that building and compiling stay short:

- CogVLM-17B (language hidden 4096, MLP 11008, 32 heads, vocab 32000; EVA2-CLIP-E at 490 px) is
  built with 1 and with 4 decoder layers (ViT likewise 1 and 4 of its 63). Each measured time
  is scaled to the full model by the per-layer cost of the two builds:
  full = t(4) + (32 - 4) x (t(4) - t(1)) / 3 for the decoder, (63 - 4) layers likewise for the ViT.
- CogVLM2-19B (Llama-3-8B decoder with GQA, vocab 128256; the ViT at 1344 px, 2x2 merge) the same
  way, for the prefill of one 1344 px image.

Measured, int4 first (the format most users run), then int8, then bf16:

- decode tok/s at batch 1, 8 and 32 (16-token text prompts, greedy, `BatchDecoder`:
  time(prefill + 1 + N tokens) - time(prefill + 1), best of 3), eager, then compiled
  (`compile_decode`, what `compile=True` runs), beside the HBM roofline of the bytes a step
  reads: `cogvlm.plan`'s decode_step (language expert, norms, head, one embedding row) plus the
  KV cache window it attends over;
- the prefill of one 490 px image (CogVLM) and of one 1344 px image (CogVLM2) with a 16-token
  question, beside the larger of its weight-read time and its matmul FLOPs at the measured peak;
- peak GPU memory of the 4-layer model's runs, counted from after quantization (the float copy
  freed, then torch.cuda.reset_peak_memory_stats), and that peak scaled to the full model by
  the plan's weight and KV cache bytes;
- correctness: the compiled decode's greedy tokens equal the eager ones, and the int4 (int8)
  prefill logits lie within a stated relative L2 distance of bf16's for the same random weights.

The roofline's bandwidth is measured here: a device-to-device copy (read + write) of 2 GiB, best
of 9 (an H100 SXM's datasheet says 3.35 TB/s); the matmul peak likewise (bf16, 8192^3).
Results go to benchmarks/results/<GPU>-<date>.json and .md.

    python benchmarks/gpu.py                 # on a CUDA machine
    python benchmarks/gpu.py --dry-run       # the whole script on CPU with tiny sizes (a test)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))
from generate import never_ending, ours_generate  # noqa: E402  (the same decode as the CPU benchmark)

from cogvlm.config import REGISTRY, CogVLMConfig, VisionConfig  # noqa: E402
from cogvlm.model import DECODE_WINDOW, CogVLMForCausalLM  # noqa: E402
from cogvlm.plan import kv_cache_bytes, weight_bytes  # noqa: E402
from cogvlm.prompt import PromptTokens, layout_batch  # noqa: E402
from cogvlm.quantize import QuantConfig, quantize_model  # noqa: E402
from tests.configs import tiny_test_config  # noqa: E402

RESULTS = Path(__file__).parent / "results"
FORMATS = {"int4": 4, "int8": 8, "bf16": None}  # int4 first
BATCHES = (1, 8, 32)
SMALL, LARGE = 1, 4  # decoder (and ViT) layers built; the full model is scaled from the two
PROMPT_LEN = 16
# int4 / int8 logits against bf16's, relative L2 distance, at 4 layers of random weights (which
# amplify rounding, unlike trained ones): measured on CPU with the real shapes, 0.53 for int4 and
# 0.056 for int8; a broken kernel gives about 1.4 (unrelated logits of the same size)
TOLERANCE = {"int4": 0.75, "int8": 0.1}


def shapes(dry_run: bool) -> dict[str, CogVLMConfig]:
    """The two families at full depth: CogVLM-17B and CogVLM2-19B (tiny stand-ins for --dry-run)."""
    if dry_run:
        tiny = tiny_test_config(vocab_size=512, num_layers=6, vision=dict(num_layers=6))
        gqa = replace(tiny, num_key_value_heads=2, vision=replace(tiny.vision, image_size=56, downsample=2))
        return {"CogVLM": tiny, "CogVLM2": gqa}
    return {"CogVLM": CogVLMConfig(vision=VisionConfig()), "CogVLM2": REGISTRY["cogvlm2-llama3-chat-19B"].config}


def cut(config: CogVLMConfig, layers: int) -> CogVLMConfig:
    """`config` with `layers` decoder layers and as many ViT layers, decoding without an end."""
    return never_ending(replace(config, num_layers=layers, vision=replace(config.vision, num_layers=layers)))


def scaled(small: float, large: float, full_layers: int) -> float:
    """A `full_layers` model's figure from the SMALL- and LARGE-layer builds' (per-layer cost)."""
    return large + (full_layers - LARGE) * (large - small) / (LARGE - SMALL)


class Budget:
    """Seconds left for the run; a step that has none left is skipped and marked so."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of HBM: a device-to-device copy reads and writes `nbytes` each, best of 9."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / best_time(lambda: dst.copy_(src), device, 9)


def matmul_peak(device: torch.device, n: int) -> float:
    """FLOP/s of an n^3 matmul in bf16 (fp32 on CPU), best of 5."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / best_time(lambda: a @ b, device, 5)


def random_model(config: CogVLMConfig, device: torch.device, bits: int | None) -> CogVLMForCausalLM:
    """Built straight on `device` in bf16, seeded random weights (the same for every format), then
    quantized in place as a load with `quant=` leaves it; the float copies of the quantized
    layers are freed and the peak-memory counter starts afresh, so it reports inference."""
    free(device)  # the previous build: a compiled one sits in a reference cycle (its step holds it)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
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
    model = model.eval().requires_grad_(False)
    if bits is not None:
        quantize_model(model, QuantConfig(bits))
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return model


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def image_chunk(config: CogVLMConfig):
    size = config.vision.image_size
    pixels = torch.randn(3, size, size, generator=torch.Generator().manual_seed(1))
    return layout_batch([PromptTokens(pixels, list(range(10, 10 + PROMPT_LEN)))], config)


def prefill_flops(config: CogVLMConfig, text: int) -> float:
    """Matmul FLOPs of one image + `text` tokens: 2 x weights x tokens per part, + attention."""
    v, h, i = config.vision, config.hidden_size, config.intermediate_size
    vit_tokens = v.num_patches + 1
    vit = v.num_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size) * vit_tokens
    merge = v.hidden_size**2 * v.downsample**2 * v.num_tokens  # CogVLM2's 2x2 conv
    adapter = (v.hidden_size * h + 3 * h * i) * v.num_tokens
    seq = config.image_tokens + text
    expert = config.num_layers * (h * config.qkv_size + h * h + 3 * h * i) * seq
    attn = 4 * v.num_layers * vit_tokens**2 * v.hidden_size + 4 * config.num_layers * seq**2 * h
    return 2 * (vit + merge + adapter + expert + h * config.vocab_size) + attn


def step_bytes(config: CogVLMConfig, bits: int | None, batch: int, new_tokens: int) -> int:
    """Bytes one decode step reads: decode_step's weights + the KV window it attends over, at the
    decode's middle length (see model.DECODE_WINDOW)."""
    length = 1 + PROMPT_LEN + new_tokens // 2
    window = min(-(-(length + 1) // DECODE_WINDOW) * DECODE_WINDOW, 1 + PROMPT_LEN + new_tokens + 1)
    return weight_bytes(config, torch.bfloat16, bits)["decode_step"] + kv_cache_bytes(config, batch, window)


@dataclass
class Run:
    """What one build (a format at SMALL or LARGE layers) measured."""

    step: dict[str, dict[int, float]] = field(default_factory=dict)  # "eager"/"compiled" -> batch -> s/token
    vit: float = float("nan")  # seconds: encode_images of one image
    prefill: float = float("nan")  # seconds: the whole image prompt
    peak: int = 0  # bytes, from after quantization
    tokens: dict[str, list[int]] = field(default_factory=dict)  # batch-1 greedy tokens, eager / compiled
    logits: torch.Tensor | None = None  # the image prompt's last logits (LARGE only), on the CPU


def decode_steps(model: CogVLMForCausalLM, config: CogVLMConfig, device: torch.device, new_tokens: int,
                 budget: Budget, repeats: int) -> tuple[dict[int, float], list[int]]:
    """Seconds per decode step at each batch size (a batch skipped when out of time), and batch 1's tokens."""
    steps, tokens = {}, []
    for batch in BATCHES:
        if budget.left() <= 0:
            break
        ids = torch.randint(3, config.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
        out = ours_generate(model, ids, new_tokens + 1)  # warm-up: kernels, allocator, compiling
        if batch == 1:
            tokens = out[0].tolist()
        t_one = best_time(lambda: ours_generate(model, ids, 1), device, repeats)
        t_all = best_time(lambda: ours_generate(model, ids, new_tokens + 1), device, repeats)
        steps[batch] = (t_all - t_one) / new_tokens
    return steps, tokens


@torch.no_grad()
def measure(config: CogVLMConfig, bits: int | None, device: torch.device, new_tokens: int, budget: Budget,
            eager: bool, compiled: bool, repeats: int) -> Run:
    """One build's prefill, then (as asked) its eager and its compiled decode."""
    model = random_model(config, device, bits)
    run = Run()
    chunk = image_chunk(config)
    pixels = chunk.images.to(device, torch.bfloat16)
    model.encode_images(pixels)
    run.vit = best_time(lambda: model.encode_images(pixels), device, repeats)
    prefill = functools.partial(model, chunk, last_only=True)
    run.logits = prefill().float().cpu()
    run.prefill = best_time(prefill, device, repeats)
    if eager:
        run.step["eager"], run.tokens["eager"] = decode_steps(model, config, device, new_tokens, budget, repeats)
    if device.type == "cuda":
        run.peak = torch.cuda.max_memory_allocated(device)
    if compiled and budget.left() > 0:
        model.compile_decode()
        run.step["compiled"], run.tokens["compiled"] = decode_steps(model, config, device, new_tokens, budget,
                                                                    repeats)
        torch._dynamo.reset()  # its frozen graphs hold packed copies of the weights
    return run


def human(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def report(full: dict[str, CogVLMConfig], runs: dict[tuple[str, str, int], Run], skipped: list[str], bw: float,
           peak: float, new_tokens: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Markdown rows and JSON records: each figure scaled to the full model, beside its roofline."""
    rows, records = [], []

    def add(fmt: str, what: str, small: float, large: float, value: float, unit: str, roof: float, note: str) -> None:
        share = f"{100 * (value / roof if unit == 'tok/s' else roof / value):.0f}%" if value == value and roof else ""
        rows.append(f"| {fmt} | {what} | {small:.4g} / {large:.4g} | {value:.4g} {unit} | {roof:.4g} {unit} "
                    f"| {share} | {note} |")
        records.append(dict(format=fmt, what=what, small=small, large=large, full=value, unit=unit, roofline=roof,
                            note=note))

    cfg = full["CogVLM"]
    for fmt, bits in FORMATS.items():
        small, large = runs.get(("CogVLM", fmt, SMALL)), runs.get(("CogVLM", fmt, LARGE))
        if small is None or large is None:
            continue
        for mode in ("eager", "compiled"):
            for batch in BATCHES:
                if batch not in small.step.get(mode, {}) or batch not in large.step.get(mode, {}):
                    continue
                s, l = small.step[mode][batch], large.step[mode][batch]
                rate = batch / scaled(s, l, cfg.num_layers)
                nbytes = step_bytes(cfg, bits, batch, new_tokens)
                add(fmt, f"decode batch {batch}, {mode}", batch / s, batch / l, rate, "tok/s", batch * bw / nbytes,
                    f"{human(nbytes)} read per step")
        vit = scaled(small.vit, large.vit, cfg.vision.num_layers)
        seconds = vit + scaled(small.prefill - small.vit, large.prefill - large.vit, cfg.num_layers)
        weights = weight_bytes(cfg, torch.bfloat16, bits)
        bound = max(weights["total"] / bw, prefill_flops(cfg, PROMPT_LEN) / peak)
        add(fmt, f"prefill 1 image, {cfg.vision.image_size} px", small.prefill * 1e3, large.prefill * 1e3,
            seconds * 1e3, "ms", bound * 1e3, f"ViT {vit * 1e3:.1f} ms; {human(weights['total'])} weights")
        if large.peak:
            small_cfg = cut(cfg, LARGE)
            cache = kv_cache_bytes(cfg, max(BATCHES), 1 + PROMPT_LEN + new_tokens + 1)
            cache_small = kv_cache_bytes(small_cfg, max(BATCHES), 1 + PROMPT_LEN + new_tokens + 1)
            estimate = large.peak + weights["total"] - weight_bytes(small_cfg, torch.bfloat16, bits)["total"] \
                + cache - cache_small
            rows.append(f"| {fmt} | peak GPU memory (after quantization) | {human(large.peak)} at {LARGE} layers "
                        f"| {human(estimate)} | | | weights {human(weights['total'])}, batch {max(BATCHES)} |")
            records.append(dict(format=fmt, what="peak memory", large=large.peak, full=estimate, unit="bytes"))
    cfg2 = full["CogVLM2"]
    for fmt, bits in FORMATS.items():
        small, large = runs.get(("CogVLM2", fmt, SMALL)), runs.get(("CogVLM2", fmt, LARGE))
        if small is None or large is None:
            continue
        vit = scaled(small.vit, large.vit, cfg2.vision.num_layers)
        seconds = vit + scaled(small.prefill - small.vit, large.prefill - large.vit, cfg2.num_layers)
        weights = weight_bytes(cfg2, torch.bfloat16, bits)["total"]
        bound = max(weights / bw, prefill_flops(cfg2, PROMPT_LEN) / peak)
        add(fmt, f"CogVLM2 prefill 1 image, {cfg2.vision.image_size} px", small.prefill * 1e3, large.prefill * 1e3,
            seconds * 1e3, "ms", bound * 1e3, f"ViT {vit * 1e3:.1f} ms; {human(weights)} weights")
    rows += [f"| | skipped: {what} | | | | | |" for what in skipped]
    return rows, records


def correctness(runs: dict[tuple[str, str, int], Run]) -> tuple[list[str], dict[str, Any]]:
    """Compiled greedy tokens == eager, per format; int4 / int8 logits within TOLERANCE of bf16."""
    lines, out = [], {}
    for fmt in FORMATS:
        run = runs.get(("CogVLM", fmt, LARGE))
        if run is not None and "compiled" in run.tokens:
            same = run.tokens["compiled"] == run.tokens["eager"]
            out[f"{fmt} compiled tokens == eager"] = same
            lines.append(f"- {fmt}: compiled greedy tokens {'==' if same else '!='} eager "
                         f"({len(run.tokens['eager'])} tokens, batch 1)")
    ref = runs.get(("CogVLM", "bf16", LARGE))
    for fmt, limit in TOLERANCE.items():
        run = runs.get(("CogVLM", fmt, LARGE))
        if ref is None or run is None:
            continue
        distance = float((run.logits - ref.logits).norm() / ref.logits.norm())
        out[f"{fmt} logits relative L2 to bf16"] = distance
        lines.append(f"- {fmt}: prefill logits at relative L2 distance {distance:.3f} from bf16's "
                     f"({'within' if distance <= limit else 'OUTSIDE'} the tolerance {limit})")
    return lines, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="the whole script on CPU with tiny sizes, 4 new tokens, one repeat, compiled through "
                         "torch.compile's eager backend and for int4 alone (inductor's CPU compile takes a minute "
                         "a graph, dynamo's tracing alone 10 s): checks the script, not speed")
    ap.add_argument("--new-tokens", type=int, help="tokens decoded per timing (default 32; 4 with --dry-run)")
    ap.add_argument("--budget", type=float, default=360,
                    help="seconds of measuring (default 360: a pass begun just before the end, compiling, may run "
                         "a minute more, and start-up takes some, so the run stays under 8 minutes); what would "
                         "start later is skipped and listed")
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help=f"where the .json and .md go (default {RESULTS})")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        print("benchmarks/gpu.py: no CUDA GPU here; --dry-run runs it on CPU with tiny sizes", file=sys.stderr)
        return 1
    device = torch.device("cpu" if args.dry_run else "cuda")
    new_tokens = args.new_tokens or (4 if args.dry_run else 32)
    repeats = 1 if args.dry_run else 3
    if args.dry_run:  # dynamo traces the step as compile=True does; inductor is left out
        torch.compile = functools.partial(torch.compile, backend="eager")
    started, budget = time.perf_counter(), Budget(args.budget)
    bw = copy_bandwidth(device, 2**24 if args.dry_run else 2**31)
    peak = matmul_peak(device, 512 if args.dry_run else 8192)
    full = shapes(args.dry_run)
    runs: dict[tuple[str, str, int], Run] = {}
    skipped: list[str] = []
    # cheapest and most wanted first: int4 eager and compiled, the other formats eager, the
    # CogVLM2 prefills, then the other formats compiled while time is left
    passes = [("CogVLM", "int4", True, True), ("CogVLM", "int8", True, False), ("CogVLM", "bf16", True, False),
              ("CogVLM2", "int4", False, False), ("CogVLM2", "bf16", False, False),
              ("CogVLM", "int8", False, True), ("CogVLM", "bf16", False, True)]
    for i, (family, fmt, eager, compiled) in enumerate(passes):
        for layers in (SMALL, LARGE):
            what = f"{family} {fmt} at {layers} layers" + (", compiled" if compiled else "")
            if args.dry_run and i >= 5:  # the same code as int4's compiled pass
                skipped.append(f"{what} (dry run)")
                continue
            if budget.left() <= 0:
                skipped.append(f"{what} (time budget)")
                continue
            run = measure(cut(full[family], layers), FORMATS[fmt], device, new_tokens, budget, eager, compiled,
                          repeats)
            known = runs.setdefault((family, fmt, layers), run)
            if known is not run:  # the compiled pass of a format measured eagerly before
                known.step.update(run.step)
                known.tokens.update(run.tokens)
            print(f"{time.perf_counter() - started:5.0f} s  {what}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    head = (f"{name}, torch {torch.__version__}: copy bandwidth {bw / 1e9:.0f} GB/s (device to device, read + "
            f"write), matmul peak {peak / 1e12:.1f} TFLOP/s, both measured; random weights, "
            f"{'tiny' if args.dry_run else 'real'} layer shapes, "
            f"built at {SMALL} and {LARGE} layers and scaled to the full depth by the per-layer cost; "
            f"{new_tokens} new tokens after a {PROMPT_LEN}-token prompt")
    rows, records = report(full, runs, skipped, bw, peak, new_tokens)
    checks, verdicts = correctness(runs)
    seconds = time.perf_counter() - started
    table = [head, "", f"| weights | what | measured at {SMALL} / {LARGE} layers | full model | roofline "
             f"| % of roofline | |", "|---|---|---|---|---|---|---|", *rows, "", "Correctness:", *checks, "",
             f"({seconds:.0f} s in all)"]
    print("\n".join(table))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{datetime.date.today().isoformat()}"
    (args.out_dir / f"{stem}.md").write_text("\n".join(table) + "\n")
    (args.out_dir / f"{stem}.json").write_text(json.dumps(
        dict(device=name, torch=torch.__version__, copy_bandwidth=bw, matmul_peak=peak, layers=[SMALL, LARGE],
             new_tokens=new_tokens, results=records, correctness=verdicts, skipped=skipped, seconds=seconds),
        indent=1) + "\n")
    print(f"wrote {args.out_dir / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
