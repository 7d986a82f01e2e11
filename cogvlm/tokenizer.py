"""Tokenizers behind one small interface, with Hugging Face `add_special_tokens=False` semantics
for prompt text (the model's config supplies bos, eos and pad):

- CogVLM v1: the Vicuna / LLaMA-2 sentencepiece `tokenizer.model` (a plain `encode`, with
  sentencepiece's leading "▁", no `<s>`);
- CogVLM2: Llama-3's byte-level BPE, the `tokenizer.json` shipped in the model repos, read with
  the `tokenizers` library; decoding skips special tokens, as the authors' demos do.

`Tokenizer(path)` opens either file, or a folder holding one.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from .errors import TokenizerError

TOKENIZER_FILE = "tokenizer.model"  # sentencepiece (CogVLM v1)
BPE_FILE = "tokenizer.json"  # Hugging Face tokenizers (CogVLM2)
TOKENIZER_FILES = (TOKENIZER_FILE, BPE_FILE)
VICUNA_REPO = "lmsys/vicuna-7b-v1.5"  # the published v1 checkpoints ship without a tokenizer


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


def tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file in a checkpoint folder, if any (sentencepiece first)."""
    return next((folder / name for name in TOKENIZER_FILES if (folder / name).is_file()), None)


class Tokenizer:
    """Text <-> token ids. `path` is the file it was read from; `file_name` the name a copy of it
    takes next to saved weights."""

    file_name: str
    path: Path
    bos_id: int | None
    eos_id: int | None
    vocab_size: int

    def __new__(cls, model_file: str | Path) -> Tokenizer:
        if cls is Tokenizer:  # pick the implementation from the file
            cls = BPETokenizer if _locate(model_file).name.endswith(".json") else SentencePieceTokenizer
        return super().__new__(cls)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` without special tokens."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, token_id: int) -> str:
        raise NotImplementedError


def _locate(model_file: str | Path) -> Path:
    path = Path(model_file)
    if path.is_dir():
        path = tokenizer_file(path) or path / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {path} (pass --tokenizer PATH to a sentencepiece "
                             f"'{TOKENIZER_FILE}', e.g. the one of {VICUNA_REPO}, or to the '{BPE_FILE}' "
                             f"of a CogVLM2 repo)")
    return path


class SentencePieceTokenizer(Tokenizer):
    file_name = TOKENIZER_FILE

    def __init__(self, model_file: str | Path) -> None:
        path = _locate(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path} is not a sentencepiece model: {e}") from None
        self.path = path
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)


class BPETokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (CogVLM2: Llama-3's 128000 BPE tokens + 256 specials)."""

    file_name = BPE_FILE

    def __init__(self, model_file: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        path = _locate(model_file)
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
        self.path = path
        self.bos_id = self.tok.token_to_id("<|begin_of_text|>")
        self.eos_id = self.tok.token_to_id("<|end_of_text|>")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def id_to_piece(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)
