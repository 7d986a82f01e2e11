"""Shared fixtures: tiny random CogVLM models and a sentencepiece tokenizer trained on the spot."""

from __future__ import annotations

from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from cogvlm.config import CogVLMConfig, tiny_test_config
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
