"""Shared fixtures: tiny random CogVLM models and a sentencepiece tokenizer trained on the spot."""

from __future__ import annotations

from pathlib import Path

import os

import pytest
import sentencepiece as spm
import torch
from hypothesis import settings

# CI gates a submission: there the fuzz tests replay one fixed sequence of examples, so a draw
# cannot fail one submission and pass the next; everywhere else each run explores new inputs.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

from cogvlm.config import CogVLMConfig
from tests.configs import tiny_test_config
from cogvlm.model import CogVLMForCausalLM

CORPUS = [
    "Question: What is in the image? Answer: a red circle and a small blue square.",
    "Question: How many objects are there? Short answer: 3",
    "Where is the green triangle? answer in [[x0,y0,x1,y1]] format. [[086,540,400,760]]",
    "Tell me what you see within the designated area [[100,200,300,400]] in the picture.",
    "The cat sat on the mat. A dog runs in the park with a yellow ball.",
    "Café naïve résumé — 北京 上海 東京 😀 emoji and accents: ü ö ä ß",
    "Numbers 0123456789 and punctuation: , . ; : ! ? ( ) [ ] { }",
]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA-like sentencepiece model: BPE, byte fallback, <unk>=0 <s>=1 </s>=2, digits split."""
    out = tmp_path_factory.mktemp("tok")
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=400,
        byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=0.99, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, minloglevel=2, num_threads=1,
    )
    return out / "tokenizer.model"


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.08) -> torch.nn.Module:
    """Give every parameter (norms, boi/eoi, CLS included) random values so no path hides."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if name.endswith(("norm.weight", "layernorm.weight", "norm1.weight")) else noise)
    return model


@pytest.fixture
def tiny_config() -> CogVLMConfig:
    return tiny_test_config(vocab_size=400)


@pytest.fixture
def tiny_model(tiny_config: CogVLMConfig) -> CogVLMForCausalLM:
    return randomize(CogVLMForCausalLM(tiny_config)).eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, sp_model_path: Path) -> Path:
    """A random tiny model saved in the Hugging Face layout with its tokenizer: what
    `CogVLM.from_pretrained(folder)` and every `--model folder` flag take."""
    import shutil

    from cogvlm.checkpoint import save_hf

    # 2048 positions, as the real checkpoints: the server tests need answers long enough to hang up on
    config = tiny_test_config(vocab_size=400, template="chat", max_position_embeddings=2048)
    model = randomize(CogVLMForCausalLM(config), seed=5)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] -= 0.5  # answers of a few tokens, not endless ones
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_hf(model.state_dict(), model.config, out)
    shutil.copy(sp_model_path, out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def talkative(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with its </s> logits zeroed: it talks until max_new_tokens, so each
    image gets an answer of its own (the original answers nothing for most images)."""
    import shutil

    from cogvlm.checkpoint import load_model, save_hf

    model, _ = load_model(tiny_checkpoint)
    with torch.no_grad():
        model.lm_head.weight[model.config.eos_token_id] = 0
    out = tmp_path_factory.mktemp("talkative") / "ckpt"
    save_hf(model.state_dict(), model.config, out)
    shutil.copy(tiny_checkpoint / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="session")
def talkative_vlm(talkative: Path):
    from cogvlm import CogVLM

    return CogVLM.from_pretrained(talkative, device="cpu")


# ---- CogVLM2 (cogvlm2.md): the same model with its options, and a Llama-3-style tokenizer ---------

@pytest.fixture(scope="session")
def bpe_tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE `tokenizer.json` shaped like Llama-3's (bos, eos, pad, eot after the
    regular tokens)."""
    from .llama3 import tiny_bpe_json

    return tiny_bpe_json(tmp_path_factory.mktemp("bpe") / "tokenizer.json", CORPUS * 20)


def tiny_cogvlm2_config(tokenizer_path: Path, **overrides) -> CogVLMConfig:
    """CogVLM2's options on a tiny model: 4 query heads on 2 KV heads, vision QKV bias, a 4x4
    patch grid merged 2x2 into 4 image tokens, RoPE base 500000 with stored frequencies, and
    the tokenizer's bos / eos / pad / <|eot_id|> ids."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tokenizer_path))
    ids = [tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                        "<|eot_id|>")]
    base = dict(vocab_size=400, num_key_value_heads=2, vision_qkv_bias=True, rope_theta=500000.0,
                rope_freqs_in_weights=True, vicuna_frame=False, bos_token_id=ids[0], eos_token_id=ids[1], pad_token_id=ids[2],
                stop_token_ids=(ids[3],), vision={"image_size": 56, "downsample": 2})
    base.update(overrides)
    return tiny_test_config(**base)


@pytest.fixture
def cogvlm2_model(bpe_tokenizer_path: Path) -> CogVLMForCausalLM:
    return randomize(CogVLMForCausalLM(tiny_cogvlm2_config(bpe_tokenizer_path)), seed=7).eval()


@pytest.fixture(scope="session")
def cogvlm2_checkpoint(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_path: Path) -> Path:
    """A random tiny CogVLM2 in the Hugging Face layout with its tokenizer.json."""
    import shutil

    from cogvlm.checkpoint import save_hf

    model = randomize(CogVLMForCausalLM(tiny_cogvlm2_config(bpe_tokenizer_path, max_position_embeddings=2048)),
                      seed=8)
    with torch.no_grad():
        model.lm_head.weight[list(model.config.stop_ids)] -= 0.3  # answers of some tokens, not endless ones
    out = tmp_path_factory.mktemp("cogvlm2") / "tiny-cogvlm2"
    save_hf(model.state_dict(), model.config, out)
    shutil.copy(bpe_tokenizer_path, out / "tokenizer.json")
    return out


@pytest.fixture
def fresh_dynamo() -> None:
    """torch.compile keeps the graphs of one function's code (every model's decode step) for the
    whole process and runs it eagerly after `recompile_limit` (8) of them: a test that checks the
    compiled step starts from none, whatever compiled before it."""
    torch._dynamo.reset()


# ---- CogVLM2-Video (cogvlm2-video.md): no visual expert, frames through the 2x2-merged tower -------

def published_video_config(tokenizer_path: Path) -> dict:
    """A tiny config.json with exactly the keys and layout of the published CogVLM2-Video files
    (docs/spec/cogvlm2-video.md section 3; no rope_theta, downsample or visual_expert: the
    architecture implies them): 4 query heads on 2 KV heads, a 4x4 patch grid merged 2x2 into 4
    tokens (6 slots a frame), the tokenizer's bos / eos / pad ids."""
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tokenizer_path))
    bos, eos, pad = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|end_of_text|>",
                                                  "<|reserved_special_token_0|>"))
    return {
        "architectures": ["CogVLMVideoForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_cogvlm.CogVLMConfig",
                     "AutoModelForCausalLM": "modeling_cogvlm.CogVLMVideoForCausalLM"},
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "hidden_act": "silu", "hidden_size": 64,
        "initializer_range": 0.02, "intermediate_size": 96, "max_position_embeddings": 2048,
        "num_attention_heads": 4, "num_hidden_layers": 2, "num_multi_query_heads": 2, "rms_norm_eps": 1e-05,
        "template_version": "base", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "vocab_size": 400,
        "vision_config": {"dropout_prob": 0.0, "hidden_act": "gelu", "hidden_size": 32, "image_size": 56,
                          "in_channels": 3, "intermediate_size": 64, "layer_norm_eps": 1e-06, "num_heads": 4,
                          "num_hidden_layers": 2, "num_positions": 17, "patch_size": 14},
    }


def published_video_names(d: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of a CogVLM2-Video checkpoint with config.json `d`, as
    docs/spec/cogvlm2-video.md section 11 lists them: CogVLM2's names without any vision-expert tensor."""
    h, inter, v = d["hidden_size"], d["intermediate_size"], d["vision_config"]
    hd = h // d["num_attention_heads"]
    qkv = (d["num_attention_heads"] + 2 * d["num_multi_query_heads"]) * hd
    dv, vi, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    names = {"model.embed_tokens.weight": (d["vocab_size"], h), "model.norm.weight": (h,),
             "lm_head.weight": (d["vocab_size"], h)}
    for i in range(d["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        names.update({pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
                      pre + "self_attn.language_expert_query_key_value.weight": (qkv, h),
                      pre + "self_attn.language_expert_dense.weight": (h, h),
                      pre + "self_attn.rotary_emb.inv_freq": (hd // 2,),
                      pre + "mlp.language_mlp.gate_proj.weight": (inter, h),
                      pre + "mlp.language_mlp.up_proj.weight": (inter, h),
                      pre + "mlp.language_mlp.down_proj.weight": (h, inter)})
    pre = "model.vision."
    names.update({pre + "patch_embedding.proj.weight": (dv, 3, p, p), pre + "patch_embedding.proj.bias": (dv,),
                  pre + "patch_embedding.cls_embedding": (1, dv),
                  pre + "patch_embedding.position_embedding.weight": (v["num_positions"], dv)})
    for j in range(v["num_hidden_layers"]):
        lp = f"{pre}transformer.layers.{j}."
        names.update({lp + "input_layernorm.weight": (dv,), lp + "input_layernorm.bias": (dv,),
                      lp + "attention.query_key_value.weight": (3 * dv, dv), lp + "attention.query_key_value.bias": (3 * dv,),
                      lp + "attention.dense.weight": (dv, dv), lp + "attention.dense.bias": (dv,),
                      lp + "mlp.fc1.weight": (vi, dv), lp + "mlp.fc1.bias": (vi,),
                      lp + "mlp.fc2.weight": (dv, vi), lp + "mlp.fc2.bias": (dv,),
                      lp + "post_attention_layernorm.weight": (dv,), lp + "post_attention_layernorm.bias": (dv,)})
    names.update({pre + "conv.weight": (dv, dv, 2, 2), pre + "conv.bias": (dv,),
                  pre + "linear_proj.linear_proj.weight": (h, dv), pre + "linear_proj.norm1.weight": (h,),
                  pre + "linear_proj.norm1.bias": (h,), pre + "linear_proj.gate_proj.weight": (inter, h),
                  pre + "linear_proj.dense_h_to_4h.weight": (inter, h),
                  pre + "linear_proj.dense_4h_to_h.weight": (h, inter), pre + "boi": (1, 1, h), pre + "eoi": (1, 1, h)})
    return names


@pytest.fixture(scope="session")
def video_checkpoint(tmp_path_factory: pytest.TempPathFactory, bpe_tokenizer_path: Path) -> Path:
    """A random tiny CogVLM2-Video as the authors publish theirs: the published config.json keys,
    the section-11 names in bf16 safetensors (the RoPE frequencies 500000^(-2i/d) too), and the
    tokenizer.json; it talks until max_new_tokens (its eos row is zero)."""
    import json
    import shutil

    from safetensors.torch import save_file

    config = published_video_config(bpe_tokenizer_path)
    g = torch.Generator().manual_seed(11)
    state = {}
    for name, shape in published_video_names(config).items():
        if name.endswith("inv_freq"):
            hd = shape[0] * 2
            t = 500000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        elif name.endswith(("norm.weight", "layernorm.weight", "norm1.weight")):
            t = 1.0 + 0.08 * torch.randn(shape, generator=g)
        else:
            t = 0.08 * torch.randn(shape, generator=g)
        state[name] = t.to(torch.bfloat16)
    state["lm_head.weight"][config["eos_token_id"]] = 0  # a logit of 0 never wins: answers run to their budget
    out = tmp_path_factory.mktemp("video") / "tiny-cogvlm2-video"
    out.mkdir()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(bpe_tokenizer_path, out / "tokenizer.json")
    return out
