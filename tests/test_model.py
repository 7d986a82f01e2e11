"""The optimized model against the spec-literal reference, on random tiny weights."""

from __future__ import annotations

import math

import pytest
import torch

from cogvlm.config import REGISTRY
from tests.configs import tiny_test_config
from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, build_prompt, layout_batch
from cogvlm.tokenizer import Tokenizer

from .reference import reference_layout, reference_logits, reference_prompt

TOL = 1e-5  # fp32 model vs float64 reference; logits here are O(1), so this is ~100 ulp of fp32


def run_single(model, text_ids, pixels=None):
    chunk = layout_batch([PromptTokens(pixels, text_ids)], model.config)
    with torch.no_grad():
        return model(chunk)[0]


def test_text_only_matches_reference(tiny_model):
    ids = [5, 17, 33, 2, 99, 150, 7]
    got = run_single(tiny_model, ids)
    want = reference_logits(tiny_model.state_dict(), tiny_model.config, ids)
    assert got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= TOL


def test_image_matches_reference(tiny_model):
    torch.manual_seed(1)
    pixels = torch.randn(3, 28, 28)
    ids = [11, 12, 13, 14]
    got = run_single(tiny_model, ids, pixels)
    want = reference_logits(tiny_model.state_dict(), tiny_model.config, ids, pixels)
    assert (got.double() - want).abs().max().item() <= TOL


@pytest.mark.parametrize("template", ["chat", "vqa", "base"])
def test_history_prompt_matches_reference(tiny_model, sp_model_path, template):
    tok = Tokenizer(sp_model_path)
    history = [("What is in the image?", "a red circle"), ("How many objects are there?", "3")]
    query = "Where is the green triangle?"
    prompt = build_prompt(query, history, template)
    assert prompt == reference_prompt(query, history, template)
    pixels = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(2))
    ids = tok.encode(prompt)
    got = run_single(tiny_model, ids, pixels)
    want = reference_logits(tiny_model.state_dict(), tiny_model.config, ids, pixels)
    assert (got.double() - want).abs().max().item() <= TOL


def test_padded_mixed_batch_matches_reference_per_row(tiny_model):
    g = torch.Generator().manual_seed(3)
    prompts = [
        PromptTokens(torch.randn(3, 28, 28, generator=g), [4, 5, 6, 7, 8, 9]),
        PromptTokens(None, [10, 11]),
        PromptTokens(torch.randn(3, 28, 28, generator=g), [12]),
        PromptTokens(torch.randn(3, 28, 28, generator=g), []),  # base captioning: empty query
    ]
    check_batch_against_reference(tiny_model, prompts)


def check_batch_against_reference(model, prompts) -> None:
    """Every row of one padded batch, all positions and the last-token shortcut, vs the reference."""
    chunk = layout_batch(prompts, model.config)
    with torch.no_grad():
        logits = model(chunk)
        last = model(chunk, last_only=True)
    for row, p in enumerate(prompts):
        want = reference_logits(model.state_dict(), model.config, p.text_ids, p.pixels)
        got = logits[row][chunk.attention_mask[row]]
        assert got.shape == want.shape
        assert (got.double() - want).abs().max().item() <= TOL
        assert (last[row].double() - want[-1]).abs().max().item() <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(tiny_model, dtype):
    pixels = torch.randn(3, 28, 28, generator=torch.Generator().manual_seed(4))
    ids = [20, 21, 22, 23, 24]
    want = run_single(tiny_model, ids, pixels)
    half = CogVLMForCausalLM(tiny_model.config)
    half.load_state_dict(tiny_model.state_dict())
    half = half.to(dtype).eval()
    got = run_single(half, ids, pixels)
    assert got.dtype == torch.float32  # logits come back in fp32 for sampling
    # bf16 has 8 mantissa bits: a few % of the logit scale after 2 layers
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()


def test_layout_position_ids_and_expert_range():
    cfg = tiny_test_config()  # 28 px / 14 = 4 patches → 6 image slots
    P = cfg.vision.num_patches
    chunk = layout_batch([PromptTokens(torch.zeros(3, 28, 28), [7, 8, 9])], cfg)
    assert chunk.input_ids.tolist() == [[1, 0, 0, 0, 0, 0, 0, 7, 8, 9]]
    assert chunk.position_ids.tolist() == [[0, 1, 2, 2, 2, 2, 3, 4, 5, 6]]
    assert chunk.attention_mask.all()
    # the model routes columns image_start .. image_start + P + 1 (boi + patches) to the visual expert
    assert (chunk.image_start, chunk.image_start + P + 1) == (1, 6)
    ids, types, positions = reference_layout([7, 8, 9], True, P)
    assert ids == chunk.input_ids[0].tolist() and positions == chunk.position_ids[0].tolist()
    assert types == list("LVVVVVVLLL")

    text_only = layout_batch([PromptTokens(None, [7, 8, 9])], cfg)
    assert text_only.input_ids.tolist() == [[1, 7, 8, 9]]
    assert text_only.position_ids.tolist() == [[0, 1, 2, 3]]
    assert text_only.images is None

    mixed = layout_batch([PromptTokens(torch.zeros(3, 28, 28), [7]), PromptTokens(None, [7, 8, 9])], cfg)
    assert mixed.input_ids.tolist() == [[1, 0, 0, 0, 0, 0, 0, 0, 0, 7], [1, 0, 0, 0, 0, 0, 0, 7, 8, 9]]
    assert mixed.attention_mask.int().tolist() == [[1, 1, 1, 1, 1, 1, 1, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, 1, 1, 1]]
    real = [p[m].tolist() for p, m in zip(mixed.position_ids, mixed.attention_mask)]
    assert real == [[0, 1, 2, 2, 2, 2, 3, 4], [0, 1, 2, 3]]
    assert mixed.image_rows.tolist() == [0]


# The parameter table of docs/spec/cogvlm.md section 7, with i over 32 decoder and j over 63 vision layers.
SPEC_DECODER = {
    "input_layernorm.weight": (4096,), "post_attention_layernorm.weight": (4096,),
    "self_attn.language_expert_query_key_value.weight": (12288, 4096),
    "self_attn.vision_expert_query_key_value.weight": (12288, 4096),
    "self_attn.language_expert_dense.weight": (4096, 4096), "self_attn.vision_expert_dense.weight": (4096, 4096),
    **{f"mlp.{e}.{p}.weight": (11008, 4096) for e in ("language_mlp", "vision_mlp") for p in ("gate_proj", "up_proj")},
    **{f"mlp.{e}.down_proj.weight": (4096, 11008) for e in ("language_mlp", "vision_mlp")},
}
SPEC_VISION_LAYER = {
    "input_layernorm.weight": (1792,), "input_layernorm.bias": (1792,),
    "attention.query_key_value.weight": (5376, 1792), "attention.query_key_value.bias": (5376,),
    "attention.dense.weight": (1792, 1792), "attention.dense.bias": (1792,),
    "mlp.fc1.weight": (15360, 1792), "mlp.fc1.bias": (15360,),
    "mlp.fc2.weight": (1792, 15360), "mlp.fc2.bias": (1792,),
    "post_attention_layernorm.weight": (1792,), "post_attention_layernorm.bias": (1792,),
}
SPEC_OTHER = {
    "model.embed_tokens.weight": (32000, 4096), "model.norm.weight": (4096,), "lm_head.weight": (32000, 4096),
    "model.vision.patch_embedding.proj.weight": (1792, 3, 14, 14), "model.vision.patch_embedding.proj.bias": (1792,),
    "model.vision.patch_embedding.cls_embedding": (1, 1792),
    "model.vision.patch_embedding.position_embedding.weight": (1226, 1792),
    "model.vision.linear_proj.linear_proj.weight": (4096, 1792),
    "model.vision.linear_proj.norm1.weight": (4096,), "model.vision.linear_proj.norm1.bias": (4096,),
    "model.vision.linear_proj.gate_proj.weight": (11008, 4096),
    "model.vision.linear_proj.dense_h_to_4h.weight": (11008, 4096),
    "model.vision.linear_proj.dense_4h_to_h.weight": (4096, 11008),
    "model.vision.boi": (1, 1, 4096), "model.vision.eoi": (1, 1, 4096),
}


def test_full_size_chat_model_has_spec_names_shapes_and_count():
    with torch.device("meta"):
        model = CogVLMForCausalLM(REGISTRY["cogvlm-chat-v1.1"].config)
    want = dict(SPEC_OTHER)
    want.update({f"model.layers.{i}.{k}": s for i in range(32) for k, s in SPEC_DECODER.items()})
    want.update({f"model.vision.transformer.layers.{j}.{k}": s for j in range(63) for k, s in SPEC_VISION_LAYER.items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want
    assert sum(math.prod(s) for s in got.values()) == 17_639_685_376


def test_base_224_has_257_positions():
    with torch.device("meta"):
        model = CogVLMForCausalLM(REGISTRY["cogvlm-base-224"].config)
    assert model.model.vision.patch_embedding.position_embedding.weight.shape == (257, 1792)
