"""CogVLM2 (cogvlm2.md) as options of the one model: against the spec-literal reference, the full
size on the meta device, its config.json, the Llama-3 tokenizer, and bitsandbytes fp4 weights."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cogvlm.checkpoint import CheckpointError, load_model, save_hf
from cogvlm.config import REGISTRY, from_hf_config
from cogvlm.model import CogVLMForCausalLM
from cogvlm.prompt import PromptTokens, build_prompt, layout_batch
from cogvlm.tokenizer import Tokenizer

from .conftest import tiny_cogvlm2_config
from .reference import reference_layout, reference_logits
from .test_model import SPEC_VISION_LAYER, check_batch_against_reference, run_single

TOL = 1e-5  # fp32 model vs float64 reference; logits here are O(1), so this is ~100 ulp of fp32
IMAGE = 56  # tiny CogVLM2: a 4x4 patch grid, merged 2x2 into 4 image tokens


def pixels(seed: int) -> torch.Tensor:
    return torch.randn(3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def max_error(model, ids, image=None) -> float:
    got = run_single(model, ids, image)
    want = reference_logits(model.state_dict(), model.config, ids, image)
    assert got.shape == want.shape
    return (got.double() - want).abs().max().item()


# ---- the forward pass against the reference ---------------------------------------------------

def test_text_only_matches_reference(cogvlm2_model):
    assert max_error(cogvlm2_model, [5, 17, 33, 2, 99, 150, 7]) <= TOL


def test_image_matches_reference(cogvlm2_model):
    cfg = cogvlm2_model.config
    assert cfg.image_tokens == 6  # boi + (4x4 / 4) + eoi
    with torch.no_grad():
        assert cogvlm2_model.encode_images(pixels(1)[None]).shape == (1, 6, cfg.hidden_size)
    assert max_error(cogvlm2_model, [11, 12, 13, 14], pixels(1)) <= TOL


def test_history_prompt_matches_reference(cogvlm2_model, bpe_tokenizer_path):
    tok = Tokenizer(bpe_tokenizer_path)
    history = [("What is in the image?", "a red circle"), ("图片里有几个物体？", "3")]
    ids = tok.encode(build_prompt("Where is the green triangle?", history, "chat"))
    assert max(ids) < cogvlm2_model.config.bos_token_id  # plain text never encodes to a special id
    assert max_error(cogvlm2_model, ids, pixels(2)) <= TOL


def test_padded_mixed_batch_matches_reference_per_row(cogvlm2_model):
    check_batch_against_reference(cogvlm2_model, [PromptTokens(pixels(3), [4, 5, 6, 7, 8, 9]),
                                                  PromptTokens(None, [10, 11]), PromptTokens(pixels(4), [12]),
                                                  PromptTokens(pixels(5), [])])


def test_layout_uses_the_llama3_ids_and_the_merged_patch_count(cogvlm2_model):
    cfg = cogvlm2_model.config
    chunk = layout_batch([PromptTokens(pixels(0), [7, 8])], cfg)
    pad = cfg.pad_token_id
    assert chunk.input_ids.tolist() == [[cfg.bos_token_id, pad, pad, pad, pad, pad, pad, 7, 8]]
    assert chunk.position_ids.tolist() == [[0, 1, 2, 2, 2, 2, 3, 4, 5]]
    ids, _, positions = reference_layout([7, 8], True, 4, cfg.bos_token_id, pad)
    assert chunk.input_ids[0].tolist() == ids and chunk.position_ids[0].tolist() == positions


@pytest.mark.parametrize("with_image", [True, False])
def test_cached_decoding_equals_recomputation_and_caches_only_kv_heads(cogvlm2_model, bpe_tokenizer_path,
                                                                        with_image):
    from cogvlm import CogVLM

    with torch.no_grad():
        cogvlm2_model.lm_head.weight[list(cogvlm2_model.config.stop_ids)] = 0  # long answers
    vlm = CogVLM(cogvlm2_model, Tokenizer(bpe_tokenizer_path))
    prompt = PromptTokens(pixels(6) if with_image else None, vlm.tokenizer.encode("Question: What is it? Answer:"))
    decoder = vlm.decoder([prompt], [vlm.sampling(max_new_tokens=12, top_k=1)])
    assert decoder.cache.k[0].shape[1] == 2  # the 2 KV heads, not the 4 query heads
    for _ in range(12):
        used = decoder.logits[0].clone() if decoder._last is None else None
        decoder.step()
        used = decoder.logits[0] if used is None else used
        full = layout_batch([PromptTokens(prompt.pixels, prompt.text_ids + decoder.generated[0][:-1])], vlm.config)
        with torch.no_grad():
            want = cogvlm2_model(full, last_only=True)[0]
        assert (used - want).abs().max().item() <= 1e-4  # fp32, SDPA vs the decode path's kernels
    assert len(decoder.generated[0]) == 12


# ---- RoPE: the stored bf16 frequencies, positions in the model's dtype ---------------------------

def test_rope_uses_the_stored_bf16_frequencies(cogvlm2_model, tmp_path):
    hd = cogvlm2_model.config.head_dim
    exact = 500000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    stored = cogvlm2_model.model.layers[1].self_attn.rotary_emb.inv_freq
    assert torch.equal(stored, exact.to(torch.bfloat16).float())  # what the published files hold
    assert not torch.equal(stored, exact.float())
    # the checkpoint's values are what the model rotates with, also when they are not the formula's
    state = cogvlm2_model.state_dict()
    for i in range(cogvlm2_model.config.num_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = (exact * 1.5).to(torch.bfloat16)
    save_hf(state, cogvlm2_model.config, tmp_path / "ckpt")
    loaded, _ = load_model(tmp_path / "ckpt")
    ids = [3, 4, 5, 6, 7, 8]
    assert max_error(loaded, ids, pixels(7)) <= TOL
    assert (run_single(loaded, ids) - run_single(cogvlm2_model, ids)).abs().max().item() > 1e-3


def test_bf16_model_rounds_positions_to_bf16(cogvlm2_model):
    positions = torch.tensor([[255, 256, 257, 258, 4113]])
    cos32, _ = cogvlm2_model._rope(positions)
    assert not torch.equal(cos32[0, 0, 1], cos32[0, 0, 2])
    half = cogvlm2_model.to(torch.bfloat16)
    assert half.model.layers[0].self_attn.rotary_emb.inv_freq.dtype == torch.bfloat16
    cos, sin = half._rope(positions)
    assert torch.equal(cos[0, 0, 1], cos[0, 0, 2]) and torch.equal(sin[0, 0, 1], sin[0, 0, 2])  # 257 -> 256
    # round to nearest, as arange in bf16 gives on CUDA: 4113 -> 4128, not 4096
    want = (torch.tensor(4128.0, dtype=torch.bfloat16) * half.model.layers[0].self_attn.rotary_emb.inv_freq).cos()
    assert torch.equal(cos[0, 0, 4, :want.shape[0]], want)


def test_layers_storing_different_frequencies_are_refused(cogvlm2_model, tmp_path):
    state = cogvlm2_model.state_dict()
    state["model.layers.1.self_attn.rotary_emb.inv_freq"] = state["model.layers.1.self_attn.rotary_emb.inv_freq"] * 2
    save_hf(state, cogvlm2_model.config, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="different RoPE frequencies"):
        load_model(tmp_path / "ckpt")


# ---- the published 19B: names, shapes, parameters, config.json ----------------------------------

SPEC_DECODER = {  # docs/spec/cogvlm2.md section 8, i over the 32 decoder layers
    "input_layernorm.weight": (4096,), "post_attention_layernorm.weight": (4096,),
    "self_attn.language_expert_query_key_value.weight": (6144, 4096),
    "self_attn.vision_expert_query_key_value.weight": (6144, 4096),
    "self_attn.vision_expert_query_key_value.bias": (6144,),
    "self_attn.language_expert_dense.weight": (4096, 4096), "self_attn.vision_expert_dense.weight": (4096, 4096),
    "self_attn.rotary_emb.inv_freq": (64,),
    **{f"mlp.{e}.{p}.weight": (14336, 4096) for e in ("language_mlp", "vision_mlp") for p in ("gate_proj", "up_proj")},
    **{f"mlp.{e}.down_proj.weight": (4096, 14336) for e in ("language_mlp", "vision_mlp")},
}
SPEC_OTHER = {
    "model.embed_tokens.weight": (128256, 4096), "model.norm.weight": (4096,), "lm_head.weight": (128256, 4096),
    "model.vision.patch_embedding.proj.weight": (1792, 3, 14, 14), "model.vision.patch_embedding.proj.bias": (1792,),
    "model.vision.patch_embedding.cls_embedding": (1, 1792),
    "model.vision.patch_embedding.position_embedding.weight": (9217, 1792),
    "model.vision.conv.weight": (1792, 1792, 2, 2), "model.vision.conv.bias": (1792,),
    "model.vision.linear_proj.linear_proj.weight": (4096, 1792),
    "model.vision.linear_proj.norm1.weight": (4096,), "model.vision.linear_proj.norm1.bias": (4096,),
    "model.vision.linear_proj.gate_proj.weight": (14336, 4096),
    "model.vision.linear_proj.dense_h_to_4h.weight": (14336, 4096),
    "model.vision.linear_proj.dense_4h_to_h.weight": (4096, 14336),
    "model.vision.boi": (1, 1, 4096), "model.vision.eoi": (1, 1, 4096),
}


@pytest.mark.parametrize("name", ["cogvlm2-llama3-chat-19B", "cogvlm2-llama3-chinese-chat-19B"])
def test_full_size_model_has_spec_names_shapes_and_count(name):
    with torch.device("meta"):
        model = CogVLMForCausalLM(REGISTRY[name].config)
    want = dict(SPEC_OTHER)
    want.update({f"model.layers.{i}.{k}": s for i in range(32) for k, s in SPEC_DECODER.items()})
    want.update({f"model.vision.transformer.layers.{j}.{k}": s for j in range(63) for k, s in SPEC_VISION_LAYER.items()})
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == want and len(got) == 1221
    assert sum(p.numel() for p in model.parameters()) == 19_503_105_280
    parts = {"model.vision.patch_embedding.": 0, "model.vision.transformer.": 0, "model.vision.conv.": 0,
             "model.vision.linear_proj.": 0}
    for k, p in model.named_parameters():
        for prefix in parts:
            parts[prefix] += p.numel() if k.startswith(prefix) else 0
    assert parts["model.vision.patch_embedding."] + parts["model.vision.transformer."] == 4_296_961_536
    assert parts["model.vision.conv."] == 12_846_848 and parts["model.vision.linear_proj."] == 183_508_992
    assert REGISTRY[name].config.image_tokens == 2306 and REGISTRY[name].config.max_position_embeddings == 8192


# The published config.json's keys (docs/spec/cogvlm2.md section 2): no num_multi_query_heads, rope_theta,
# torch_dtype; those come from the authors' config class and code.
PUBLISHED = {
    "architectures": ["CogVLMForCausalLM"], "bos_token_id": 128000, "eos_token_id": [128001, 128009],
    "pad_token_id": 128002, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 32, "rms_norm_eps": 1e-05, "template_version": "chat", "tie_word_embeddings": False,
    "use_cache": True, "vocab_size": 128256,
    "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 63,
                      "hidden_size": 1792, "patch_size": 14, "num_heads": 16, "intermediate_size": 15360,
                      "layer_norm_eps": 1e-06, "num_positions": 9217, "image_size": 1344},
}


def test_published_config_json_reads_as_the_registry_entry():
    cfg = from_hf_config(PUBLISHED)
    assert cfg == REGISTRY["cogvlm2-llama3-chat-19B"].config
    assert (cfg.num_key_value_heads, cfg.rope_theta, cfg.stop_ids) == (8, 500000.0, (128001, 128009))
    assert from_hf_config(cfg.to_hf_dict()) == cfg
    assert from_hf_config({**PUBLISHED, "num_key_value_heads": 4}).num_key_value_heads == 4  # the TGI copy's key
    for name in ("cogvlm2-llama3-chat-19B", "cogvlm2-llama3-chinese-chat-19B"):
        assert REGISTRY[name].hf_repo == f"THUDM/{name}" and REGISTRY[name].config.template == "chat"
    video = from_hf_config({**PUBLISHED, "architectures": ["CogVLMVideoForCausalLM"]})  # test_video_model.py
    assert video.video and not video.visual_expert


def test_tiny_config_round_trips_through_config_json(bpe_tokenizer_path):
    cfg = tiny_cogvlm2_config(bpe_tokenizer_path)
    assert from_hf_config(json.loads(json.dumps(cfg.to_hf_dict()))) == cfg


# ---- the Llama-3 tokenizer ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory) -> Tokenizer:
    from .llama3 import llama3_tokenizer_json

    return Tokenizer(llama3_tokenizer_json(tmp_path_factory.mktemp("llama3") / "tokenizer.json"))


def test_prompt_ids_are_llama3s(llama3_tokenizer):
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    tok = llama3_tokenizer
    cfg = REGISTRY["cogvlm2-llama3-chat-19B"].config
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (cfg.bos_token_id, cfg.eos_token_id, cfg.vocab_size)
    assert tok.tok.token_to_id("<|reserved_special_token_0|>") == cfg.pad_token_id
    assert tok.tok.token_to_id("<|eot_id|>") == cfg.stop_token_ids[0]
    prompt = build_prompt("What is in the image?", (), cfg.template)
    assert tok.encode(prompt) == [14924, 25, 3639, 374, 304, 279, 2217, 30, 22559, 25]
    meta = MetaTokenizer.get_instance()  # Meta's own tiktoken tokenizer over the same ranks
    for text in (build_prompt("这张图片里有什么？", [("Describe it.", "A cat.\n\nIt sleeps.")], "chat"),
                 "  numbers 1234567 and 'll 'S  naïve café 😀\tend\r\n"):
        assert tok.encode(text) == meta.encode(text, bos=False, eos=False)
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([cfg.bos_token_id, *tok.encode("Hello"), 128009]) == "Hello"  # specials skipped


def test_tokenizer_picks_the_file_format(sp_model_path, bpe_tokenizer_path, tmp_path):
    from cogvlm.tokenizer import BPETokenizer, SentencePieceTokenizer, TokenizerError

    assert type(Tokenizer(sp_model_path)) is SentencePieceTokenizer
    assert type(Tokenizer(bpe_tokenizer_path)) is BPETokenizer
    assert type(Tokenizer(bpe_tokenizer_path.parent)) is BPETokenizer  # a folder with tokenizer.json
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizer.json"):
        Tokenizer(tmp_path)


@pytest.mark.parametrize("stop", ["eos", "eot"])
def test_both_stop_ids_end_an_answer(cogvlm2_model, bpe_tokenizer_path, stop):
    from cogvlm import CogVLM

    cfg = cogvlm2_model.config
    stop_id = cfg.eos_token_id if stop == "eos" else cfg.stop_token_ids[0]
    vlm = CogVLM(cogvlm2_model, Tokenizer(bpe_tokenizer_path))
    prompt = vlm.prompt_tokens(None, "Hi")
    logits = vlm.decoder([prompt], [vlm.sampling(top_k=1)]).logits[0]
    first = logits.argmax().item()
    with torch.no_grad():  # make the stop id's logit beat the first answer token's
        scale = 1.5 if logits[first] > 0 else 0.5
        cogvlm2_model.lm_head.weight[stop_id] = cogvlm2_model.lm_head.weight[first] * scale
    decoder = vlm.decoder([prompt], [vlm.sampling(max_new_tokens=5, top_k=1)])
    for _ in decoder.run():
        pass
    assert decoder.finished_by_eos == [True] and decoder.generated == [[]]


# ---- bitsandbytes fp4 ---------------------------------------------------------------------------

# bitsandbytes' fp4 code (docs/spec/cogvlm2.md section 1): 0, 1/192, 8/12, 1, 4/12, 6/12, 2/12, 3/12, then negated
FP4 = torch.tensor([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3]) / 12
BLOCK = 64


def pack_fp4(weight: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
    """`weight` as bitsandbytes serializes a 4-bit linear weight: nearest code per value after
    dividing by its block's absmax, two codes per byte (even index in the high nibble)."""
    flat = weight.float().reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % BLOCK)).view(-1, BLOCK)
    absmax = blocks.abs().amax(1)
    scaled = (blocks / absmax.clamp_min(1e-30)[:, None]).reshape(-1)[:n]
    codes = (scaled[:, None] - FP4).abs().argmin(1).to(torch.uint8)
    record = {"quant_type": "fp4", "blocksize": BLOCK, "dtype": str(weight.dtype).removeprefix("torch."),
              "shape": list(weight.shape)}
    return {name: (codes[0::2] << 4 | codes[1::2])[:, None], name + ".absmax": absmax, name + ".quant_map": FP4.clone(),
            name + ".quant_state.bitsandbytes__fp4": torch.tensor(list(json.dumps(record).encode()), dtype=torch.uint8)}


def on_fp4_grid(shape, dtype, seed) -> torch.Tensor:
    """Values bitsandbytes fp4 stores exactly: a code times its block's absmax (each block holds a +-1 code)."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    codes = torch.randint(0, 16, (n,), generator=g)
    codes[::BLOCK] = 3  # the block maximum
    absmax = (torch.rand(-(-n // BLOCK), generator=g) + 0.5).to(torch.bfloat16).float()  # exact in bf16 and fp16
    return (FP4[codes] * absmax.repeat_interleave(BLOCK)[:n]).view(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp4_round_trip_is_exact(dtype):
    from cogvlm.bnb import unpack_state

    weight = on_fp4_grid((6, 20), dtype, seed=0)  # 120 values: one full block and a partial one
    packed = pack_fp4(weight, "w.weight")
    assert packed["w.weight"].shape == (60, 1) and packed["w.weight"].dtype == torch.uint8
    unpacked = dict(unpack_state({**packed, "w.bias": torch.ones(6)}))
    assert sorted(unpacked) == ["w.bias", "w.weight"]
    assert unpacked["w.weight"].dtype == dtype and torch.equal(unpacked["w.weight"], weight)


def write_bnb_fp4(folder, state: dict[str, torch.Tensor], config: dict,
                  packed: tuple[str, ...] = ("model.layers.", "model.vision.transformer.")) -> None:
    """`state` as the int4 repos ship theirs: one pytorch_model.bin, every linear weight under
    `packed` in bitsandbytes fp4 (rounded to its nearest code), the rest as they are."""
    stored = {}
    for k, v in state.items():
        if v.ndim == 2 and k.endswith(".weight") and k.startswith(packed):
            stored.update(pack_fp4(v, k))
        else:
            stored[k] = v
    folder.mkdir(parents=True)
    torch.save(stored, folder / "pytorch_model.bin")
    config = config | {"quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                               "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": False}}
    (folder / "config.json").write_text(json.dumps(config))


def test_int4_checkpoint_loads_into_the_model(cogvlm2_model, tmp_path):
    """A whole tiny CogVLM2 as the int4 repos ship it: one pytorch_model.bin, every linear weight
    of the decoder and ViT in fp4, the rest (lm_head, norms, embeddings, conv) plain, fp16."""
    want = {}
    for k, v in cogvlm2_model.state_dict().items():
        linear = v.ndim == 2 and k.endswith(".weight") and k.startswith(("model.layers.", "model.vision.transformer."))
        want[k] = on_fp4_grid(v.shape, torch.float16, seed=len(want)) if linear else v.to(torch.float16)
    write_bnb_fp4(tmp_path / "int4", want, cogvlm2_model.config.to_hf_dict())
    model, _ = load_model(tmp_path / "int4")
    got = model.state_dict()
    assert sorted(got) == sorted(want)
    assert [k for k in want if not torch.equal(got[k], want[k].float())] == []


# Re-quantizing the fp4 weights in int4 groups of 128 (a uniform grid: fp4's codes are not) drifts
# the tiny model's logits from the unpacked bf16 ones by 28% RMS / 31% of the largest (measured),
# as much as int4 of the original bf16 weights (24% / 32%): random weights fill every group's
# range (see test_quantize's drift test). Bounds: 1.5x the measurements.
def test_int4_checkpoint_with_quant_4_requantizes_each_weight_while_streaming(cogvlm2_model, bpe_tokenizer_path,
                                                                                tmp_path, monkeypatch):
    """`--quant 4` on an int4 repo: each fp4 weight is unpacked and re-quantized before the next
    one is unpacked (never the bf16 model), giving, bit for bit, what quantizing the unpacked
    bf16 model gives."""
    import weakref

    from cogvlm import CogVLM, bnb
    from cogvlm.quantize import Int4Linear, QuantConfig, quantize_model

    folder = tmp_path / "int4"
    state = {k: v.to(torch.bfloat16) for k, v in cogvlm2_model.state_dict().items()}
    write_bnb_fp4(folder, state, cogvlm2_model.config.to_hf_dict(), packed=("model.layers.",))
    unpacked: list[weakref.ref] = []
    most_alive = 0
    real = bnb.dequantize

    def dequantize(*args):
        nonlocal most_alive
        most_alive = max(most_alive, sum(ref() is not None for ref in unpacked))
        out = real(*args)
        unpacked.append(weakref.ref(out.untyped_storage()))  # alive while any view of it is
        return out

    monkeypatch.setattr(bnb, "dequantize", dequantize)
    load = dict(device="cpu", tokenizer=bpe_tokenizer_path, prepack=False)
    model = CogVLM.from_pretrained(folder, quant=4, **load).model
    assert len(unpacked) == 2 * 5 * cogvlm2_model.config.num_layers  # 2 experts x (qkv, dense, 3 MLP)
    assert most_alive <= 1  # the one before, still named by the loader's loop variables
    linears = {n: type(m) for n, m in model.named_modules() if n.startswith("model.layers.") and
               isinstance(m, (torch.nn.Linear, Int4Linear))}
    assert len(linears) == len(unpacked) and set(linears.values()) == {Int4Linear}
    assert isinstance(model.lm_head, Int4Linear) and model.dtype == torch.bfloat16

    unpacked_bf16 = CogVLM.from_pretrained(folder, dtype="bf16", **load).model
    chunk = layout_batch([PromptTokens(pixels(1), [5, 6, 7, 8, 9]), PromptTokens(None, [10, 11, 12])],
                         cogvlm2_model.config)
    real_rows = chunk.attention_mask
    with torch.no_grad():
        got, want = model(chunk)[real_rows], unpacked_bf16(chunk)[real_rows]
        assert torch.equal(got, quantize_model(unpacked_bf16, QuantConfig(4))(chunk)[real_rows])
    drift = got - want
    assert drift.pow(2).mean().sqrt() <= 0.42 * want.pow(2).mean().sqrt()
    assert drift.abs().max() <= 0.47 * want.abs().max()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_vision_qkv_keeps_its_bias(cogvlm2_model, bits):
    from cogvlm.quantize import Int4Linear, Int8Linear, QuantConfig, quantize_model

    original = cogvlm2_model.model.layers[0].self_attn.vision_expert_query_key_value
    bias = original.bias.detach().clone()
    quantize_model(cogvlm2_model, QuantConfig(bits))
    layer = cogvlm2_model.model.layers[0].self_attn.vision_expert_query_key_value
    assert isinstance(layer, Int8Linear if bits == 8 else Int4Linear) and torch.equal(layer.bias, bias.bfloat16())
    x = torch.randn(3, cogvlm2_model.config.hidden_size)
    with torch.no_grad():
        out = layer(x).float()
        layer.bias = None
        without = layer(x).float()
    # the bias is added to the kernel's bf16 output: one bf16 rounding of the sum apart
    assert torch.allclose(out, without + bias.bfloat16().float(), atol=2**-7 * out.abs().max().item())


def test_plan_counts_kv_heads():
    from cogvlm.plan import kv_cache_bytes

    cfg = REGISTRY["cogvlm2-llama3-chat-19B"].config
    # 32 layers x (k, v) x 8192 slots x 8 heads x 128 x 2 bytes, plus the validity mask
    assert kv_cache_bytes(cfg, 1, 8192) == 2 * 32 * 8192 * 8 * 128 * 2 + 8192
