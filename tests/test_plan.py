"""The memory plan: byte counts for the real cogvlm-chat-v1.1 config, checked against the sizes
written out by hand from the spec's shapes and our packed formats."""

from __future__ import annotations

import torch

from cogvlm.config import REGISTRY
from tests.configs import tiny_test_config
from cogvlm.model import KVCache
from cogvlm.plan import kv_cache_bytes, weight_bytes

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
