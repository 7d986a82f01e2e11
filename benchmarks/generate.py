"""Generation speed on CPU: ours vs Hugging Face transformers' LlamaForCausalLM, side by side.

A mid-size random CogVLM (language hidden 1024, 8 layers, 16 heads; ViT 12 layers at 224 px), and
the same shaped as CogVLM2 (16 query heads on 4 KV heads as its 32 on 8, RoPE base 500000 with
bf16-stored frequencies, vision QKV bias, the 2x2 conv after the ViT).
The peer is a LlamaForCausalLM with the same language weights (SDPA attention, static cache),
decoding the same text-only prompt; both are greedy and must produce the same tokens. Decode
speed is measured the same way for both: time(prefill + 1 + N tokens) - time(prefill + 1 token),
the best of several repeats taken in turns (this machine is shared and noisy).
Ours runs as `CogVLM.from_pretrained` gives it on CPU, with oneDNN-prepacked weights (and, in
fp32, the plain ones for single-row inputs); the "compiled" column is `from_pretrained(...,
compile=True)` (the decode step under torch.compile, compiled before timing); "unpacked" is the
same model with plain `nn.Linear` weights.
A second table puts the quantized models (`quantize_model` on the bf16 model: int8 per row, int4
in groups of 128, bf16 activations, as `from_pretrained(..., quant=)` gives them; eager and with
`compile=True`; and int4 with PyTorch's kernel instead of cogvlm's own, `cogvlm.kernels`) beside
ours in fp32 (eager and compiled) and bf16 and the fp32 peer, all in one `decode_rates` call
(taking turns).
Also printed: each decode as a share of the machine's memory-bandwidth bound: the bytes one
step really reads (language expert, norms, output head, one embedding row: `cogvlm.plan`'s
decode_step, from the real stored layout) over the read bandwidth measured in this run as the
best of several multi-threaded streaming reads of a buffer far larger than the caches. Where a
decode is near the bound, no implementation that reads the same bytes can be much faster.

    pip install -e '.[bench]' && python benchmarks/generate.py [--new-tokens 64] [--tables dtypes quant]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from cogvlm.config import CogVLMConfig, VisionConfig
from cogvlm.generate import BatchDecoder, SamplingParams
from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, layout_batch
from cogvlm.plan import weight_bytes
from cogvlm.quantize import Int4Linear, QuantConfig, prepack_model, quantize_model


def never_ending(config: CogVLMConfig) -> CogVLMConfig:
    """`config` with eos_token_id -1, so that neither side ever stops early and both decode
    exactly N tokens. Set past the config's checks, which rightly refuse it for a checkpoint."""
    object.__setattr__(config, "eos_token_id", -1)
    return config


CONFIG = CogVLMConfig(hidden_size=1024, intermediate_size=2816, num_layers=8, num_heads=16,
                      vision=VisionConfig(image_size=224, hidden_size=768, num_layers=12, num_heads=12,
                                          intermediate_size=3072))
CONFIG2 = never_ending(replace(CONFIG, intermediate_size=3584, num_key_value_heads=4, vision_qkv_bias=True,
                               rope_theta=500000.0, rope_freqs_in_weights=True,
                               vision=replace(CONFIG.vision, downsample=2)))
CONFIG = never_ending(CONFIG)
SHAPES = {"CogVLM": CONFIG, "CogVLM2 (GQA)": CONFIG2}
PROMPT_LEN = 16


def random_model(dtype: torch.dtype, config: CogVLMConfig = CONFIG) -> CogVLMForCausalLM:
    torch.manual_seed(0)
    model = CogVLMForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name and p.ndim == 1 else torch.randn_like(p) * 0.02)
    return model.to(dtype).eval().requires_grad_(False)  # as load_weights leaves it


def hf_peer(model: CogVLMForCausalLM):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                      num_key_value_heads=c.num_key_value_heads,
                      rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, max_position_embeddings=2048,
                      tie_word_embeddings=False, attn_implementation="sdpa", bos_token_id=1, eos_token_id=None,
                      pad_token_id=0)
    peer = LlamaForCausalLM(cfg).to(model.dtype).eval()
    sd = model.state_dict()
    state = {"model.embed_tokens.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
             "lm_head.weight": sd["lm_head.weight"]}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        kv = c.num_key_value_heads * c.head_dim
        q, k, v = sd[p + "self_attn.language_expert_query_key_value.weight"].split([c.hidden_size, kv, kv])
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v,
                      p + "self_attn.o_proj.weight": sd[p + "self_attn.language_expert_dense.weight"],
                      p + "input_layernorm.weight": sd[p + "input_layernorm.weight"],
                      p + "post_attention_layernorm.weight": sd[p + "post_attention_layernorm.weight"]})
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[p + f"mlp.{name}.weight"] = sd[p + f"mlp.language_mlp.{name}.weight"]
    peer.load_state_dict(state, strict=False)
    if c.rope_freqs_in_weights:  # rotate with the same (bf16-rounded) frequencies
        peer.model.rotary_emb.inv_freq.copy_(model.model.layers[0].self_attn.rotary_emb.inv_freq)
    return peer


def timed(fn, repeats: int = 3) -> float:
    """Seconds: the best of `repeats`, the least disturbed run."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


@torch.no_grad()
def ours_generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    prompts = [PromptTokens(None, row.tolist()) for row in ids]
    chunk = layout_batch(prompts, model.config)
    cache = model.new_cache(len(prompts), chunk.input_ids.shape[1] + new_tokens)
    logits = model(chunk, cache, last_only=True)
    params = [SamplingParams(max_new_tokens=new_tokens)] * len(prompts)
    decoder = BatchDecoder(model, cache, logits, chunk.position_ids[:, -1] + 1, params, chunk.input_ids,
                           [new_tokens] * len(prompts))
    while not decoder.done:
        decoder.step()
    return torch.tensor(decoder.generated)


@torch.no_grad()
def hf_generate(peer, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    full = torch.cat([torch.ones(ids.shape[0], 1, dtype=torch.long), ids], 1)  # <s> + text
    out = peer.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=new_tokens,
                        do_sample=False, eos_token_id=None, cache_implementation="static",
                        pad_token_id=0)
    return out[:, full.shape[1]:]


def decode_rates(runs: dict, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """{name: (tokens/s, tokens)} for `runs` = {name: (generate, model)}. The contenders take turns
    within each repeat and each keeps its best time, so a noisy neighbour on a shared machine
    slows a single repeat, not one side of the comparison. One untimed run each first (compiling,
    first-touch allocations)."""
    for gen, model in runs.values():
        gen(model, ids, new_tokens + 1)
    best = {name: [float("inf"), float("inf")] for name in runs}
    tokens = {}
    for _ in range(repeats):
        for name, (gen, model) in runs.items():
            for i, n in enumerate((1, new_tokens + 1)):
                t = time.perf_counter()
                out = gen(model, ids, n)
                best[name][i] = min(best[name][i], time.perf_counter() - t)
            tokens[name] = out
    return {name: (ids.shape[0] * new_tokens / (t_all - t_one), tokens[name])
            for name, (t_one, t_all) in best.items()}


def bandwidth_gbs(gib: int = 2) -> float:
    """The machine's read bandwidth: the best of 9 multi-threaded streaming reads (a sum, which
    does one add per 4 bytes, far below what the cores can do) of a buffer of `gib` GiB, far
    larger than the caches (a matrix-vector product, measured before, ran below this)."""
    buf = torch.ones(gib * 2**28)
    t = timed(lambda: buf.sum(), repeats=9)
    return buf.numel() * 4 / t / 1e9


def step_bytes(dtype: torch.dtype, bits: int | None = None, config: CogVLMConfig = CONFIG) -> int:
    """Bytes one text token's decode step reads, from the stored layout (see cogvlm.plan)."""
    return weight_bytes(config, dtype, bits)["decode_step"]


def quantized_table(bw: float, new_tokens: int, repeats: int) -> None:
    """int8 / int4 beside ours in fp32 and bf16 and the HF fp32 peer, in one run taking turns."""
    print("\n| model | batch | tok/s | x ours fp32 | x HF fp32 | bytes read per step | % of bandwidth bound |")
    print("|---|---|---|---|---|---|---|")

    def quantized(bits: int, compile: bool = False, pytorch_kernel: bool = False) -> CogVLMForCausalLM:
        model = quantize_model(random_model(torch.bfloat16), QuantConfig(bits))  # bf16, as from_pretrained
        if pytorch_kernel:  # PyTorch's int4 kernel at every row count, as before cogvlm.kernels
            for m in model.modules():
                if isinstance(m, Int4Linear):
                    m.kernels = None
        if compile:
            model.compile_decode()
            return model
        return prepack_model(model)  # the full-precision rest (vision, adapter) as from_pretrained packs it

    compiled_fp32 = random_model(torch.float32)
    compiled_fp32.compile_decode()
    runs = {"ours fp32": (ours_generate, prepack_model(random_model(torch.float32))),
            "ours fp32, compiled": (ours_generate, compiled_fp32),
            "ours bf16": (ours_generate, prepack_model(random_model(torch.bfloat16))),
            "int8": (ours_generate, quantized(8)), "int8, compiled": (ours_generate, quantized(8, True)),
            "int4": (ours_generate, quantized(4)), "int4, compiled": (ours_generate, quantized(4, True)),
            "int4, PyTorch's kernel": (ours_generate, quantized(4, pytorch_kernel=True)),
            "int4, PyTorch's kernel, compiled": (ours_generate, quantized(4, True, pytorch_kernel=True)),
            "HF fp32": (hf_generate, hf_peer(random_model(torch.float32)))}
    fp32, bf16 = step_bytes(torch.float32), step_bytes(torch.bfloat16)
    int8, int4 = step_bytes(torch.bfloat16, 8), step_bytes(torch.bfloat16, 4)
    nbytes = {"ours fp32": fp32, "ours fp32, compiled": fp32, "ours bf16": bf16, "int8": int8, "int8, compiled": int8,
              "int4": int4, "int4, compiled": int4, "int4, PyTorch's kernel": int4,
              "int4, PyTorch's kernel, compiled": int4, "HF fp32": fp32}
    for batch in (1, 8):
        ids = torch.randint(3, CONFIG.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
        rates = decode_rates(runs, ids, new_tokens, repeats)
        for name, (rate, _) in rates.items():
            bound = bw * 1e9 / nbytes[name] * batch
            print(f"| {name} | {batch} | {rate:.1f} | {rate / rates['ours fp32'][0]:.2f}x | {rate / rates['HF fp32'][0]:.2f}x "
                  f"| {nbytes[name] / 1e6:.1f} MB | {100 * rate / bound:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="best of this many, taken in turns (default 5)")
    ap.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--tables", nargs="+", choices=("dtypes", "quant"), default=["dtypes", "quant"],
                    help="dtypes: ours / compiled / unpacked / HF per shape and dtype; quant: int8 and int4 beside them")
    args = ap.parse_args()
    import transformers

    bw = bandwidth_gbs()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"read bandwidth (streaming, 2 GiB) {bw:.1f} GB/s, {args.new_tokens} new tokens, prompt {PROMPT_LEN} tokens")
    if "quant" in args.tables:
        quantized_table(bw, args.new_tokens, args.repeats)
    if "dtypes" not in args.tables:
        return
    print()
    print("| model | dtype | image prefill ms (unpacked) | batch | ours tok/s | compiled tok/s | unpacked tok/s "
          "| HF Llama tok/s | ours / HF | compiled / HF | % of bandwidth bound: ours / compiled / HF | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape, dtype in ((s, {"fp32": torch.float32, "bf16": torch.bfloat16}[d]) for s in args.shapes
                         for d in args.dtypes):
        torch._dynamo.reset()  # the previous dtype's compiled graphs count against dynamo's recompile limit
        config = SHAPES[shape]
        unpacked = random_model(dtype, config)
        peer = hf_peer(unpacked)
        bound = bw * 1e9 / step_bytes(dtype, config=config)
        model = prepack_model(random_model(dtype, config))
        compiled = random_model(dtype, config)
        compiled.compile_decode()
        image = PromptTokens(torch.randn(3, 224, 224), list(range(10, 10 + PROMPT_LEN)))
        chunk = layout_batch([image], config)
        prefill = {}
        for name, m in (("ours", model), ("unpacked", unpacked)):
            with torch.no_grad():
                prefill[name] = timed(lambda: m(chunk, m.new_cache(1, chunk.input_ids.shape[1]), last_only=True))
        for batch in (1, 8):
            ids = torch.randint(3, CONFIG.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
            rates = decode_rates({"ours": (ours_generate, model), "compiled": (ours_generate, compiled),
                                  "unpacked": (ours_generate, unpacked), "hf": (hf_generate, peer)},
                                 ids, args.new_tokens, args.repeats)
            ours, fast, before, theirs = (rates[k][0] for k in ("ours", "compiled", "unpacked", "hf"))
            same = all(torch.equal(rates[k][1], rates["hf"][1]) for k in ("ours", "compiled"))
            share = " / ".join(f"{100 * r / (bound * batch):.0f}%" for r in (ours, fast, theirs))
            print(f"| {shape} | {str(dtype).removeprefix('torch.')} | {prefill['ours'] * 1e3:.0f} ({prefill['unpacked'] * 1e3:.0f}) "
                  f"| {batch} | {ours:.1f} | {fast:.1f} | {before:.1f} | {theirs:.1f} | {ours / theirs:.2f}x "
                  f"| {fast / theirs:.2f}x | {share} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
