"""The Vicuna / LLaMA-2 sentencepiece tokenizer, with Hugging Face `add_special_tokens=False`
semantics for prompt text: a plain `encode` (with sentencepiece's leading "▁"), no `<s>`."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"
VICUNA_REPO = "lmsys/vicuna-7b-v1.5"  # the published checkpoints ship without a tokenizer


class TokenizerError(ValueError):
    pass


def train_tokenizer(texts: list[str], out_file: str | Path, vocab_size: int) -> Path:
    """Train a sentencepiece model with LLaMA-2's settings: BPE, byte fallback, digits split,
    <unk>=0 <s>=1 </s>=2, no pad, a leading "▁" prefix, no text normalization."""
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    corpus = out_file.with_suffix(".corpus.txt")
    corpus.write_text("\n".join(texts))
    try:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(out_file.with_suffix("")), model_type="bpe",
            vocab_size=vocab_size, byte_fallback=True, split_digits=True, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, add_dummy_prefix=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, character_coverage=1.0, hard_vocab_limit=False,
            minloglevel=2, num_threads=1)
    finally:
        corpus.unlink(missing_ok=True)
    out_file.with_suffix(".vocab").unlink(missing_ok=True)
    return out_file


class Tokenizer:
    def __init__(self, model_file: str | Path) -> None:
        path = Path(model_file)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenizerError(f"tokenizer model not found: {path} (pass --tokenizer PATH to a "
                                 f"sentencepiece '{TOKENIZER_FILE}', e.g. the one of {VICUNA_REPO})")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a sentencepiece model: {e}") from None
        self.path = path
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        return self.sp.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)
