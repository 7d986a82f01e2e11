"""The Vicuna / LLaMA-2 sentencepiece tokenizer, with Hugging Face `add_special_tokens=False`
semantics for prompt text: a plain `encode` (with sentencepiece's leading "▁"), no `<s>`."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

TOKENIZER_FILE = "tokenizer.model"
VICUNA_REPO = "lmsys/vicuna-7b-v1.5"  # the published checkpoints ship without a tokenizer


class TokenizerError(ValueError):
    pass


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
