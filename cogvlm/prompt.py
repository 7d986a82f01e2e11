"""Prompt templates (docs/spec/cogvlm.md section 5) and the token layout of a batch (docs/spec/cogvlm.md section 4)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .config import TEMPLATES, CogVLMConfig
from .errors import ImageRequiredError
from .image import ImageInput, load_image, preprocess
from .model import Chunk
from .tokenizer import TokenizerError

History = Sequence[tuple[str, str]]


# Vicuna v1.1's system prompt: the language weights are Vicuna-7B-v1.5's, and the authors' demo
# (basic_demo/cli_demo_hf.py) frames a conversation without an image in it
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
                 "gives helpful, detailed, and polite answers to the user's questions.")


def build_prompt(query: str, history: History = (), template: str = "chat", image: bool = True) -> str:
    """The text that follows the image: base ignores history; chat, vqa and inst replay it.

    Without an image, every template but base sends Vicuna's conversation instead, as the
    authors' demo does: `{VICUNA_SYSTEM} USER: {q1} ASSISTANT: {a1}\\nUSER: {query} ASSISTANT:`.
    base always sends the query verbatim. CogVLM2's callers pass `image=True` for text-only
    conversations too (its config's `vicuna_frame` is off: its single-GPU demos keep the template).
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, not {template!r}")
    if template == "base":
        return _unicode(query)
    if not image:
        turns = "".join(f"USER: {q} ASSISTANT: {a}\n" for q, a in history)
        return _unicode(f"{VICUNA_SYSTEM} {turns}USER: {query} ASSISTANT:")
    if template == "inst":  # CogAgent's chat (docs/spec/cogagent.md section 11)
        turns = "".join(f" [INST] {q} [/INST] {a}" for q, a in history)
        return _unicode(f"{turns} [INST] {query} [/INST] ")
    answer_format = "Answer:" if template == "chat" else "Short answer:"
    turns = "".join(f"Question: {q} {answer_format} {a}\n" for q, a in history)
    return _unicode(f"{turns}Question: {query} {answer_format}")


def _unicode(text: str) -> str:
    """`text`, if the tokenizer can take it: a lone surrogate (JSON's "\\ud800", or bytes that are
    not UTF-8 on a command line) has no UTF-8 form and would fail deep inside the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"the text is not valid Unicode ({e.reason}: {text[e.start]!r})") from None
    return text


def agent_query(task: str, grounding: bool = True, sentence: str = "What steps do I need to take to <TASK>?") -> str:
    """CogAgent's GUI-agent question (docs/spec/cogagent.md section 11): the task in double quotes in one of
    the authors' task sentences, and `(with grounding)` right after it (no space) for an answer
    that ends in a `Grounded Operation:` line with the element's box."""
    if "<TASK>" not in sentence:
        raise ValueError("the agent sentence must contain <TASK>")
    return sentence.replace("<TASK>", f'"{task}"') + ("(with grounding)" if grounding else "")


@dataclass
class PromptTokens:
    """One conversation ready for the model: pixels (or None), its text token ids, and for
    CogAgent the same picture at the high resolution."""

    pixels: torch.Tensor | None
    text_ids: list[int]
    cross_pixels: torch.Tensor | None = None


def image_pixels(image: ImageInput | None, cfg: CogVLMConfig) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The model's input pixels for one picture: (low-res, high-res or None). Both come from the
    original picture (docs/spec/cogagent.md section 5). CogAgent refuses a conversation without an image."""
    if image is None:
        if cfg.cross_vision is not None:
            raise ImageRequiredError("CogAgent needs an image (a screenshot) for every conversation; "
                                     "neither of the authors' code paths supports text-only chat")
        return None, None
    picture = load_image(image)
    cross = None if cfg.cross_vision is None else preprocess(picture, cfg.cross_vision.image_size)
    return preprocess(picture, cfg.vision.image_size), cross


def image_advances(num_patches: int) -> list[bool]:
    """Which image slots advance the position id: boi, the first patch vector, eoi (patch vectors
    share one)."""
    return [True, True] + [False] * (num_patches - 1) + [True]


def layout_batch(prompts: Sequence[PromptTokens], cfg: CogVLMConfig) -> Chunk:
    """Lay several conversations out as one right-aligned prefill chunk.

    Every row is `<s> | image slots | padding | text`. Rows without an image hold padding in the
    image slots, so the image occupies the *same columns* in every row and expert routing is a
    single column range. Padding neither advances positions nor is attended to.
    """
    has_image = [p.pixels is not None for p in prompts]
    n_img = cfg.image_tokens if any(has_image) else 0
    text_len = max(len(p.text_ids) for p in prompts)
    length = 1 + n_img + text_len
    ids = torch.full((len(prompts), length), cfg.pad_token_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), length, dtype=torch.bool)
    advance = torch.zeros(len(prompts), length, dtype=torch.bool)
    img_adv = torch.tensor(image_advances(cfg.vision.num_tokens))
    for row, p in enumerate(prompts):
        ids[row, 0] = cfg.bos_token_id
        valid[row, 0] = advance[row, 0] = True
        if p.pixels is not None:
            valid[row, 1:1 + n_img] = True
            advance[row, 1:1 + n_img] = img_adv
        if p.text_ids:
            ids[row, length - len(p.text_ids):] = torch.tensor(p.text_ids)
            valid[row, length - len(p.text_ids):] = True
            advance[row, length - len(p.text_ids):] = True
    positions = advance.long().cumsum(1) - 1  # padding repeats the previous position
    images = rows = cross = None
    if any(has_image):
        images = torch.stack([p.pixels for p in prompts if p.pixels is not None])
        if not all(has_image):
            rows = torch.tensor([i for i, h in enumerate(has_image) if h])
    if any(p.cross_pixels is not None for p in prompts):
        if not all(p.cross_pixels is not None for p in prompts):
            raise ImageRequiredError("CogAgent needs an image in every conversation of a batch")
        cross = torch.stack([p.cross_pixels for p in prompts])
    return Chunk(ids, positions, valid, images=images, image_rows=rows, image_start=1, cross_images=cross)


def continuation_chunk(token_ids: torch.Tensor, next_positions: torch.Tensor) -> Chunk:
    """Text tokens (B, N) appended after a conversation whose next position is `next_positions`."""
    n = token_ids.shape[1]
    positions = next_positions[:, None] + torch.arange(n, device=next_positions.device)
    return Chunk(token_ids, positions)
