"""The memory plan: byte counts for the real cogvlm-chat-v1.1 config, checked against the sizes
written out by hand from the spec's shapes and our packed formats."""

from __future__ import annotations

import pytest
import torch

from cogvlm.config import REGISTRY
from tests.configs import tiny_test_config
from cogvlm.model import KVCache
from cogvlm.plan import dequant_buffer_bytes, kv_cache_bytes, plan, weight_bytes

REAL = REGISTRY["cogvlm-chat-v1.1"].config
H, I, L, V = 4096, 11008, 32, 32000  # Vicuna-7B dims (docs/spec/cogvlm.md section 2)
VH, VI, VL = 1792, 15360, 63  # EVA2-CLIP-E, last layer dropped
PATCHES = (490 // 14) ** 2


def linear_bytes(n: int, k: int, bits: int | None, group: int = 128, bias: bool = False) -> int:
    """One Linear's stored bytes: bf16 weight; int8 (N, K up to 16) + a bf16 scale per row;
    int4 two values per byte on (N up to 16, K up to the group) + bf16 scale and zero per group."""
    if bits is None:
        return 2 * n * k + (2 * n if bias else 0)
    if bits == 8:
        return n * -(-k // 16) * 16 + 2 * n + (2 * n if bias else 0)
    rows, width = -(-n // 16) * 16, -(-k // group) * group
    return rows * width // 2 + (width // group) * rows * 2 * 2


def expected(bits: int | None, vision_bits: int | None, group: int = 128) -> dict[str, int]:
    expert = (linear_bytes(3 * H, H, bits, group) + linear_bytes(H, H, bits, group)
              + 2 * linear_bytes(I, H, bits, group) + linear_bytes(H, I, bits, group))
    decoder = L * (2 * expert + 2 * 2 * H) + 2 * H  # two experts and two RMSNorms per layer, final norm
    vit_layer = (linear_bytes(3 * VH, VH, vision_bits, bias=True) + linear_bytes(VH, VH, vision_bits, bias=True)
                 + linear_bytes(VI, VH, vision_bits, bias=True) + linear_bytes(VH, VI, vision_bits, bias=True)
                 + 2 * 2 * 2 * VH)  # two LayerNorms, weight + bias
    adapter = (linear_bytes(H, VH, vision_bits) + 2 * 2 * H + 2 * linear_bytes(I, H, vision_bits)
               + linear_bytes(H, I, vision_bits))
    embed = 2 * (3 * VH * 14 * 14 + VH + VH + (PATCHES + 1) * VH)  # conv w + b, CLS, positions
    vision = VL * vit_layer + adapter + embed + 2 * 2 * H  # boi, eoi
    head = linear_bytes(V, H, bits, group)
    step = L * (expert + 2 * 2 * H) + 2 * H + head + 2 * H
    return {"embeddings": 2 * V * H, "decoder": decoder, "lm_head": head, "vision": vision,
            "total": 2 * V * H + decoder + head + vision, "decode_step": step}


def test_weight_bytes_of_the_real_config_are_exact():
    for bits, vision_bits in ((None, None), (8, None), (4, None), (4, 8), (8, 8)):
        assert weight_bytes(REAL, torch.bfloat16, bits, 128, vision_bits) == expected(bits, vision_bits), (bits, vision_bits)
    assert weight_bytes(REAL, torch.bfloat16, 4, 32) == expected(4, None, 32)
    # the headline numbers (docs/quantization.md): bf16 35.3 GB, int4 16.1 GB, int4 + int8 ViT 11.6 GB
    assert weight_bytes(REAL)["total"] == 35_279_370_752
    assert round(weight_bytes(REAL, quant_bits=4)["total"] / 1e9, 2) == 16.06
    assert round(weight_bytes(REAL, quant_bits=4, vision_bits=8)["total"] / 1e9, 2) == 11.65


def test_fp32_doubles_every_unquantized_byte():
    bf16, fp32 = weight_bytes(REAL, torch.bfloat16), weight_bytes(REAL, torch.float32)
    assert {k: 2 * v for k, v in bf16.items()} == fp32


def test_kv_cache_bytes_match_the_cache_the_model_allocates():
    assert kv_cache_bytes(REAL, 1, 2048) == 2 * L * H * 2048 * 2 + 2048  # K and V in bf16 + validity mask
    assert kv_cache_bytes(REAL, 8, 2048) == 8 * kv_cache_bytes(REAL, 1, 2048)
    small = tiny_test_config()
    cache = KVCache(3, 50, small, torch.bfloat16, "cpu")
    allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v) + cache.valid.numel()
    assert kv_cache_bytes(small, 3, 50, torch.bfloat16) == allocated


def test_help_memory_plan_matches_the_plan():
    from cogvlm.cli.flags import MEMORY_PLAN

    for bits, vision_bits in ((None, None), (8, None), (4, None), (4, 8)):
        assert f"{weight_bytes(REAL, torch.bfloat16, bits, 128, vision_bits)['total'] / 1e9:.1f} GB" in MEMORY_PLAN
    assert f"KV cache {kv_cache_bytes(REAL, 1, 2048) / 1e9:.2f} GB per 2048-token row" in MEMORY_PLAN


def test_a_rank_of_a_quantized_split_holds_its_slices_in_int4():
    """--tp 2 --quant 4: against the bf16 split (counted in test_tp), only the decoder's linears
    (both experts) and the output head change, each rank's slice in int4 with its own padding and
    groups: column-split layers keep all inputs, row-split ones (dense, down) half."""
    from cogvlm.plan import rank_weight_bytes

    def expert(bits: int | None) -> int:
        return (linear_bytes(3 * H // 2, H, bits) + linear_bytes(H, H // 2, bits)
                + 2 * linear_bytes(I // 2, H, bits) + linear_bytes(H, I // 2, bits))

    quantized = L * 2 * expert(4) + linear_bytes(V // 2, H, 4)
    plain = L * 2 * expert(None) + linear_bytes(V // 2, H, None)
    assert rank_weight_bytes(REAL, 2, torch.bfloat16, 4) - rank_weight_bytes(REAL, 2) == quantized - plain
    assert rank_weight_bytes(REAL, 2, torch.bfloat16, 4) == 8_178_617_088  # README: 2 x 12 GB cards


def test_plan_takes_the_same_quantization_flags_as_every_verb(capsys):
    """`plan --quant 4 --group-size 32 --quant-vision 8` counts what `chat` with the same flags
    would load: the weights line is weight_bytes of exactly that quantization."""
    from cogvlm.cli import main

    assert main(["plan", "cogvlm-chat-v1.1", "--quant", "4", "--group-size", "32", "--quant-vision", "8"]) == 0
    out = capsys.readouterr().out
    want = weight_bytes(REAL, torch.bfloat16, 4, 32, 8)["total"]
    assert want < weight_bytes(REAL, torch.bfloat16, 4, 32)["total"]  # the ViT in int8 is counted
    assert f"{want / 2**30:.2f}" in out, out


MiB, GiB = 2**20, 2**30


def test_a_nominal_card_is_planned_at_what_it_offers_cuda():
    """'24GB' is the size a card is sold as; CUDA sees 24,259 MiB of a 3090 (23.69 GiB). GiB and
    MiB are exact; a nominal size the table lacks gets the table's lowest share (the 12 GB card's)."""
    from cogvlm.plan import usable_memory

    assert usable_memory("24GB")[0] == 24259 * MiB and "23.69 GiB" in usable_memory("24GB")[1]
    assert usable_memory("80GB")[0] == 81082 * MiB  # 79.18 GiB, as an H100 80GB reports
    assert usable_memory("40GB")[0] == 40536 * MiB and usable_memory("48 gb")[0] == 48676 * MiB
    assert usable_memory("16GB")[0] == 16130 * MiB and usable_memory("12GB")[0] == 11931 * MiB
    assert usable_memory("23.5GiB") == (int(23.5 * GiB), "23.5 GiB as given")
    assert usable_memory("24259MB")[0] == usable_memory("24259MiB")[0] == 24259 * MiB  # torch prints MiB as MB
    assert usable_memory("32GB")[0] == int(32 * GiB * 11931 / 12288)


def test_cogvlm_17b_int8_on_a_24gb_card_by_hand(capsys):
    """`cogvlm plan cogvlm-chat-v1.1 --quant 8 --gpu-memory 24GB`, every line written out from the
    config (docs/spec/cogvlm.md section 2: Vicuna-7B, EVA2-CLIP-E at 490 px, 2048 tokens)."""
    from cogvlm.cli import main

    n = 2048
    weights = expected(8, None)["total"]  # int8 decoder and head, bf16 ViT, counted above
    kv = 2 * L * n * H * 2 + n  # K and V of 32 layers in bf16, and the slot mask
    s = PATCHES + 1  # ViT tokens: 35 x 35 patches + CLS
    vit = s * (2 * VH + 7 * VH + 2 * VI) * 2
    decoder = n * (4 * H + 10 * H + 3 * I) * 2  # the larger: 370 MB against the ViT layer's 115 MB
    image = (PATCHES + 2) * H * 2  # boi + 1225 patch vectors + eoi, written into the sequence
    logits = V * 4 * 2
    activations = max(vit, decoder) + image + logits
    attention = 0  # one prompt: _mask gives None, SDPA runs is_causal and materializes nothing
    dequantized = V * H * 2  # int8 layers multiply from a bf16 copy on CUDA: the output head's is the largest
    runtime = (512 + 64 + 256) * MiB  # CUDA context, cuBLAS + cuBLASLt workspaces, allocator; no NCCL
    total = weights + kv + activations + attention + dequantized + runtime
    card = 24259 * MiB  # what an RTX 3090 offers CUDA
    assert (weights, kv, attention, total) == (22_201_791_488, 1_073_743_872, 0, 24_790_549_504)
    assert main(["plan", "cogvlm-chat-v1.1", "--quant", "8", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    for name, value in (("weights", weights), ("KV cache", kv), ("activations", activations),
                        ("attention", attention), ("dequantized", dequantized), ("runtime", runtime),
                        ("total", total)):
        assert f"{name:<12} {value:>16,} bytes" in out, (name, out)
    assert "CUDA context 512 MiB, cuBLAS workspaces 64 MiB, allocator slack 256 MiB)" in out
    assert f"fits in 23.69 GiB per device ({(card - total) / GiB:.2f} GiB to spare)" in out  # 0.60 GiB
    assert "RTX 3090 reports 24,259" in out  # says which figure it planned against


def test_cogvlm2_tp2_at_8k_by_hand(capsys):
    """`cogvlm plan cogvlm2-llama3-chat-19B --tp 2 --max-length 8192 [--batch 2]`, from
    docs/spec/cogvlm2.md section 2 (Llama-3-8B: 32 query heads, 8 KV heads; 1344 px images). One
    prompt prefills with is_causal and SDPA's own GQA: no mask. Two prompts of different lengths
    need the padded mask, the same on both ranks: at 8K it is 2 x 4 N^2 = 0.5 GiB."""
    from cogvlm.cli import main
    from cogvlm.config import REGISTRY
    from cogvlm.plan import plan

    n, h2, i2, v2 = 8192, 4096, 14336, 128256
    weights = 19_717_991_168  # one rank's split, counted by hand in tests/test_tp.py
    kv = 2 * 32 * n * (8 // 2) * 128 * 2 + n  # 4 of the 8 KV heads per rank, width 128, bf16
    patches = (1344 // 14) ** 2  # 96 x 96 ViT patches; a 2x2 merge leaves 48 x 48 = 2304 image tokens
    vit = (patches + 1) * (2 * VH + (7 * VH + 2 * VI) // 2) * 2
    decoder = n * (4 * h2 + (10 * h2 + 3 * i2) // 2) * 2
    activations = max(vit, decoder) + (48 * 48 + 2) * h2 * 2 + v2 * 4 * 2
    runtime = (512 + 64 + 512 + 256) * MiB  # now with NCCL's buffers
    total = weights + kv + activations + runtime
    p = plan(REGISTRY["cogvlm2-llama3-chat-19B"].config, tp=2, max_length=n)
    assert (p.kv_cache, p.activations, p.attention, p.runtime, p.per_device) == (kv, activations, 0, runtime, total)
    assert total == 22_640_374_528  # 21.09 GiB
    assert main(["plan", "cogvlm2-llama3-chat-19B", "--tp", "2", "--max-length", "8192", "--gpu-memory", "24GB"]) == 0
    out = capsys.readouterr().out
    assert "attention                   0 bytes" in out and "none: one prompt prefills with is_causal" in out
    assert "NCCL buffers 512 MiB" in out
    assert f"fits in 23.69 GiB per device ({(24259 * MiB - total) / GiB:.2f} GiB to spare)" in out  # 2.60

    causal = 2 * n * n  # _mask: boolean (2, 1, N, N); no copy per query group (enable_gqa)
    bias = 2 * 2 * n * n  # SDPA's additive bf16 bias of that mask
    inverted = 2 * n * n  # mask.logical_not(), alive while the bias is built
    two = plan(REGISTRY["cogvlm2-llama3-chat-19B"].config, tp=2, batch=2, max_length=n)
    assert two.attention == causal + bias + inverted == 536_870_912
    assert main(["plan", "cogvlm2-llama3-chat-19B", "--tp", "2", "--max-length", "8192", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert f"attention    {two.attention:>16,} bytes" in out and "padded batch's prefill mask" in out


def test_the_mask_is_padded_when_its_rows_do_not_align():
    """SDPA's memory-efficient kernel copies a bias whose rows are not a multiple of 8 into an
    aligned one; that copy replaces the inverted mask at the peak (bf16: 2 bytes each)."""
    from cogvlm.plan import attention_bytes

    n = 2047
    assert attention_bytes(REAL, torch.bfloat16, 2, n) == 2 * (n * n + 2 * n * n + 2 * n * 2048)
    assert attention_bytes(REAL, torch.bfloat16, 6, 2048) == 3 * attention_bytes(REAL, torch.bfloat16, 2, 2048)
    assert attention_bytes(REAL, torch.bfloat16, 1, 2047) == 0  # one prompt: is_causal, no mask


def test_serve_sets_expandable_segments_unless_the_user_chose():
    """`cogvlm serve` lets the allocator grow segments (the plan's allocator slack shrinks with it),
    before CUDA starts; a user's own PYTORCH_CUDA_ALLOC_CONF (or PyTorch 2.9's PYTORCH_ALLOC_CONF)
    is kept as it is."""
    from cogvlm.cli.serve import use_expandable_segments

    env: dict[str, str] = {}
    assert use_expandable_segments(env) and env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    env = {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert not use_expandable_segments(env) and env == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    env = {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}
    assert not use_expandable_segments(env) and env == {"PYTORCH_ALLOC_CONF": "expandable_segments:False"}


def test_serve_sets_it_before_anything_loads(monkeypatch):
    """cmd_serve's first act: even a serve that fails at once (no FastAPI here, or a bad flag)
    has set it, so it is in place before any load could start CUDA."""
    import os

    from cogvlm.cli import main

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    main(["serve", "--api-key", " "])  # refused before the load: an empty key
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.slow
def test_the_gpu_benchmark_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu.py --dry-run: every pass of the GPU script (build, quantize, decode eager and
    traced, both prefills, scaling, correctness, the JSON and Markdown) on tiny CPU models, so a
    GPU run does not fail on a typo; without CUDA and without --dry-run it says so in one line."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    run = subprocess.run([sys.executable, str(script), "--dry-run", "--out-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    (md,), (js,) = tmp_path.glob("*.md"), tmp_path.glob("*.json")
    result = json.loads(js.read_text())
    whats = {(r["format"], r["what"]) for r in result["results"]}
    assert {("int4", "decode batch 32, compiled"), ("bf16", "decode batch 1, eager"),
            ("int8", "prefill 1 image, 28 px"), ("bf16", "CogVLM2 prefill 1 image, 56 px")} <= whats
    assert result["correctness"]["int4 compiled tokens == eager"] is True
    assert result["correctness"]["int4 logits relative L2 to bf16"] < 0.75
    assert "compiled greedy tokens == eager" in md.read_text() and "skipped: CogVLM bf16" in md.read_text()
    if not torch.cuda.is_available():
        bare = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert (bare.returncode, bare.stdout) == (1, "")
        assert bare.stderr == "benchmarks/gpu.py: no CUDA GPU here; --dry-run runs it on CPU with tiny sizes\n"


def test_the_cuda_dequantization_buffer_is_the_largest_layer_that_uses_it():
    """Quantized on CUDA, layers that `quantize.route` sends to cuBLAS are dequantized into one
    shared bf16 buffer (`quantize.scratch`): int8 always (the 32000-row output head is the
    largest); int4 from 256 rows, which a prefill's decoder reaches (the fused QKV, 3H x H, is
    the largest decoder layer) and the output head, one row per prompt, only at batch 256."""
    assert dequant_buffer_bytes(REAL, quant_bits=8) == 2 * V * H
    assert dequant_buffer_bytes(REAL, quant_bits=4) == 2 * 3 * H * H
    assert dequant_buffer_bytes(REAL, quant_bits=4, batch=256) == 2 * V * H
    assert dequant_buffer_bytes(REAL, 2, quant_bits=4) == 2 * 3 * H * H // 2  # a rank's column share
    assert dequant_buffer_bytes(REAL) == 0
    bf16, int4 = plan(REAL), plan(REAL, quant=4)
    assert bf16.dequantized == 0 and int4.dequantized == 2 * 3 * H * H
    assert int4.per_device - int4.dequantized == int4.weights + int4.kv_cache + int4.activations + int4.runtime
