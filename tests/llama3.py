"""Llama-3-style `tokenizer.json` files for the tests, built with the `tokenizers` library.

`llama3_tokenizer_json` rebuilds the real one that ships in the CogVLM2 repos from Meta's BPE
ranks (`llama_models/llama3/tokenizer.model`, tiktoken format): the same 128000 tokens, the merges
the Hugging Face conversion derives from the ranks (every split of a token into two tokens, in
rank order: 280147 of them), the tiktoken pre-split regex, byte-level encoding, and the 256
special tokens; its post-processor adds `<|begin_of_text|>`, as the published file's does, so a
caller that forgets `add_special_tokens=False` gets a wrong answer. `tiny_bpe_json` trains a small
tokenizer of the same structure for tiny test models.
"""

from __future__ import annotations

import base64
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
            "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes, which byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


def _finish(tok: Tokenizer, specials: list[str]) -> Tokenizer:
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = tok.token_to_id(specials[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{specials[0]} $A", pair=f"{specials[0]} $A {specials[0]} $B", special_tokens=[(specials[0], bos)])
    return tok


def llama3_tokenizer_json(out: Path) -> Path:
    import llama_models

    ranks = {}
    for line in (Path(llama_models.__file__).parent / "llama3" / "tokenizer.model").read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    enc = _byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    merges = sorted((rank, ranks[t[:i]], ranks[t[i:]], text(t[:i]), text(t[i:]))
                    for t, rank in ranks.items() for i in range(1, len(t)) if t[:i] in ranks and t[i:] in ranks)
    tok = _byte_level(Tokenizer(models.BPE({text(t): r for t, r in ranks.items()}, [m[3:] for m in merges],
                                            ignore_merges=True)))
    specials = SPECIALS + [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(SPECIALS) + 2)]
    _finish(tok, specials)
    tok.save(str(out))
    return out


def tiny_bpe_json(out: Path, texts: list[str], vocab_size: int = 380) -> Path:
    """Byte-level BPE of the Llama-3 structure, regular tokens first, then bos, eos, pad, eot."""
    tok = _byte_level(Tokenizer(models.BPE(ignore_merges=True)))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    _finish(tok, ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|eot_id|>"])
    tok.save(str(out))
    return out
