"""Prompt templates (docs/spec/cogvlm.md section 5) and the token layout of a batch (docs/spec/cogvlm.md
section 4), video clips included (docs/spec/cogvlm2-video.md sections 6 and 7)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch

from .config import TEMPLATES, CogVLMConfig
from .errors import ImageError, ImageRequiredError, VideoError
from .image import ImageInput, TowerFrames, load_image, preprocess, preprocess_frames
from .model import Chunk
from .tokenizer import Tokenizer, TokenizerError

History = Sequence[tuple[str, str]]
# a clip: a file path, its encoded bytes, or the decoded frames as a uint8 (3, T, H, W) tensor
VideoInput = Union[str, Path, bytes, torch.Tensor, TowerFrames]


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
    CogAgent the same picture at the high resolution. A video conversation has `frames` (T, 3,
    S, S) instead of pixels, and `frame_labels`, the text ids that follow each frame (the chat
    template's frame index; none in base and vqa, whose frames then form one run)."""

    pixels: torch.Tensor | None
    text_ids: list[int]
    cross_pixels: torch.Tensor | None = None
    frames: torch.Tensor | None = None
    frame_labels: tuple[list[int], ...] = ()


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


def check_takes_video(cfg: CogVLMConfig) -> None:
    """`VideoError` unless the model takes clips."""
    if not cfg.video:
        raise VideoError("this model takes images, not videos: load a CogVLM2-Video model "
                         "(cogvlm2-video-llama3-chat, cogvlm2-video-llama3-base, cogvlm2-llama3-caption)")


def video_frames(video: VideoInput, cfg: CogVLMConfig, template: str) -> torch.Tensor:
    """The tower's input (T, 3, S, S) for one clip: a uint8 (3, T, H, W) tensor as it is, a
    file or its bytes decoded and sampled by the rule the authors pair with the template
    (docs/spec/cogvlm2-video.md section 8: "base" for the base template, else "chat"), then
    preprocessed; `TowerFrames` are preprocessed already."""
    check_takes_video(cfg)
    if isinstance(video, TowerFrames):
        size = cfg.vision.image_size
        if video.pixels.ndim != 4 or video.pixels.shape[1:] != (3, size, size):
            raise VideoError(f"these frames were prepared as {tuple(video.pixels.shape)}; this model's tower "
                             f"takes (frames, 3, {size}, {size})")
        return video.pixels
    if not isinstance(video, torch.Tensor):
        from .video import load_video, strategy_for  # decoding needs a video library; frame tensors do not

        video = load_video(video, strategy=strategy_for(template))
    return preprocess_frames(video, cfg.vision.image_size)


def frame_labels(tokenizer: Tokenizer, frames: int, template: str) -> tuple[list[int], ...]:
    """The text after each frame: its index in the sampled list, as decimal text, with the chat
    template; nothing otherwise (docs/spec/cogvlm2-video.md section 6)."""
    if template == "chat":
        return tuple(tokenizer.encode(str(k)) for k in range(frames))
    return tuple([] for _ in range(frames))


def visual_input(image: ImageInput | None, video: VideoInput | None, cfg: CogVLMConfig, tokenizer: Tokenizer,
                 template: str) -> PromptTokens:
    """A conversation's picture or clip, ready for the model, with no text yet: one of the two
    at most, and the one the model takes (a video model's input is clips)."""
    if video is not None:
        if image is not None:
            raise VideoError("give an image or a video, not both: a conversation holds one of them")
        frames = video_frames(video, cfg, template)
        return PromptTokens(None, [], frames=frames, frame_labels=frame_labels(tokenizer, len(frames), template))
    if image is not None and cfg.video:
        raise ImageError("this model takes videos, not images: pass the clip as video= (CLI: --video)")
    pixels, cross = image_pixels(image, cfg)
    return PromptTokens(pixels, [], cross)


def visual_segment(prompt: PromptTokens, cfg: CogVLMConfig) -> tuple[list[int], list[int]]:
    """The ids and token types (1: a slot the tower's embeddings fill) between bos and the text:
    one image's slots, or each frame's slots followed by its label (docs/spec/cogvlm2-video.md section 6)."""
    slots = cfg.image_tokens
    if prompt.pixels is not None:
        return [cfg.pad_token_id] * slots, [1] * slots
    ids: list[int] = []
    types: list[int] = []
    for label in prompt.frame_labels:
        ids += [cfg.pad_token_id] * slots + list(label)
        types += [1] * slots + [0] * len(label)
    return ids, types


def prompt_length(prompt: PromptTokens, cfg: CogVLMConfig) -> int:
    """Sequence slots the conversation takes: bos, its image or frames (with their labels), text.
    A published video chat prompt of T frames and n text tokens: 1 + 67 T + n."""
    return 1 + len(visual_segment(prompt, cfg)[0]) + len(prompt.text_ids)


def run_advances(types: Sequence[int]) -> list[bool]:
    """Which tokens of one unpadded sequence advance the position id, by the authors' rule
    (docs/spec/cogvlm2-video.md section 6, docs/spec/cogvlm.md section 4): the first and last slot
    of each run of slots (type 1) count as text; a token advances if it is text, or a slot right
    after text. So a run's start, its second slot and its end advance and the slots between
    repeat; the first token takes position 0."""
    n = len(types)
    text = [t == 0 or (i == 0 or types[i - 1] == 0) or (i == n - 1 or types[i + 1] == 0)
            for i, t in enumerate(types)]
    return [i == 0 or text[i] or text[i - 1] for i in range(n)]


def layout_batch(prompts: Sequence[PromptTokens], cfg: CogVLMConfig) -> Chunk:
    """Lay several conversations out as one right-aligned prefill chunk.

    Every row is `<s> | image slots or frames | padding | text`. Rows without an image hold
    padding in the image slots, so the image occupies the *same columns* in every row and expert
    routing is a single column range. A row's frames (each frame's slots, then its label) fill
    the columns after bos, as many as its clip needs; `frame_slots` marks the slots. Padding
    neither advances positions nor is attended to: each row's positions are those of its tokens
    alone (`run_advances`).
    """
    segments = [visual_segment(p, cfg) for p in prompts]
    n_visual = max(len(seg_ids) for seg_ids, _ in segments)
    text_len = max(len(p.text_ids) for p in prompts)
    length = 1 + n_visual + text_len
    ids = torch.full((len(prompts), length), cfg.pad_token_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), length, dtype=torch.bool)
    advance = torch.zeros(len(prompts), length, dtype=torch.bool)
    slots = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, (p, (seg_ids, seg_types)) in enumerate(zip(prompts, segments)):
        n, text = len(seg_ids), length - len(p.text_ids)
        ids[row, 0] = cfg.bos_token_id
        ids[row, 1:1 + n] = torch.tensor(seg_ids, dtype=torch.long)
        ids[row, text:] = torch.tensor(p.text_ids, dtype=torch.long)
        columns = torch.cat([torch.arange(1 + n), torch.arange(text, length)])
        valid[row, columns] = True
        advance[row, columns] = torch.tensor(run_advances([0] + seg_types + [0] * len(p.text_ids)))
        if p.frames is not None:
            slots[row, 1:1 + n] = torch.tensor(seg_types, dtype=torch.bool)
    positions = advance.long().cumsum(1) - 1  # padding repeats the previous position
    has_image = [p.pixels is not None for p in prompts]
    images = rows = cross = frames = None
    if any(has_image):
        images = torch.stack([p.pixels for p in prompts if p.pixels is not None])
        if not all(has_image):
            rows = torch.tensor([i for i, h in enumerate(has_image) if h])
    if any(p.cross_pixels is not None for p in prompts):
        if not all(p.cross_pixels is not None for p in prompts):
            raise ImageRequiredError("CogAgent needs an image in every conversation of a batch")
        cross = torch.stack([p.cross_pixels for p in prompts])
    if any(p.frames is not None for p in prompts):
        frames = torch.cat([p.frames for p in prompts if p.frames is not None])
    return Chunk(ids, positions, valid, images=images, image_rows=rows, image_start=1, cross_images=cross,
                 frames=frames, frame_slots=None if frames is None else slots)


def continuation_chunk(token_ids: torch.Tensor, next_positions: torch.Tensor) -> Chunk:
    """Text tokens (B, N) appended after a conversation whose next position is `next_positions`."""
    n = token_ids.shape[1]
    positions = next_positions[:, None] + torch.arange(n, device=next_positions.device)
    return Chunk(token_ids, positions)
