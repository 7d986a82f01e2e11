"""The OpenAI-compatible HTTP API (`/v1/chat/completions`, `/v1/models`) behind `cogvlm serve`
(cli/serve.py holds the flags): request schema and checks, image and video fetching, the FastAPI app.

Every request goes through one `Scheduler`, so concurrent requests decode together in one batch
instead of queueing. Client mistakes get OpenAI-style error bodies with 4xx codes, so that
OpenAI client libraries raise their usual exceptions; a 500 always means a bug or an engine failure.

FastAPI and uvicorn are an optional extra (`pip install 'cogvlm[serve]'`): they are imported
inside `create_app` (and checked by `cogvlm serve` before loading), so the rest of the CLI works
without them. (No `from __future__ import annotations` here: FastAPI reads the route functions'
annotations at run time.)
"""

import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import re
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator

from PIL import Image

from .api import CogVLM
from .config import TEMPLATES
from .errors import (CogVLMError, ContextLengthError, ImageError, ImageRequiredError, ImageTooLargeError,
                     TensorParallelError, TokenizerError, VideoError)
from .generate import SamplingParams
from .image import MAX_IMAGE_BYTES, MAX_IMAGE_MEMORY, MAX_IMAGE_PIXELS, decoded_bytes, load_image, read_file
from .prompt import PromptTokens, check_takes_video
from .scheduler import Job, Scheduler
from .video import NUM_FRAMES, VideoLimits, decode_video, probe_video, strategy_for

if TYPE_CHECKING:
    import torch
    from fastapi import FastAPI, Request

MIME = {"image": "image/png", "video": "video/mp4"}  # the example a message shows for each kind
API_NAMES = {"max_new_tokens": "max_tokens"}  # engine name -> OpenAI request field
# The request fields: what we use; what we accept and ignore (they change nothing about an answer,
# or only at the value given here); what we refuse when set (ignoring them would mislead the
# client). Any other field is a 400 `unknown_parameter`, as OpenAI answers a misspelled one.
USED = ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
        "n", "stream", "stream_options")
EXTENSIONS = ("top_k", "repetition_penalty", "template")  # ours (and vLLM's): documented in docs/serve.md
IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice")
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "logprobs": False,
           "response_format": {"type": "text"}}
UNSUPPORTED = ("tools", "functions", "function_call", "top_logprobs", "audio", "modalities", "prediction",
               "web_search_options", "reasoning_effort")
# Limits on what a request may make the server do (each 4xx names the one it hit).
MAX_JSON_DEPTH = 32  # our own requests nest 6 deep
MAX_INT_DIGITS = 24  # seeds reach 2**64 (20 digits); Python refuses to parse past 4,300 digits
# JSON's structural characters ([ { , :) in a body: a base64 image has none, and no context (8,192
# positions at most) holds text with more than 100,000 commas; 100,000 parse in ~70 ms
MAX_JSON_TOKENS = 100_000
PARSE_SECONDS = 2.0  # parsing and checking a body, in a worker thread


# What one clip from a client may make the server (and the web demo) do: the file, its whole length
# (every packet is read to sample it), its frames (each indexed before sampling; 10 minutes at 60
# fps) and one frame's width x height (a sampled 1080p frame takes 62 MB until preprocessed)
VIDEO_LIMITS = VideoLimits(max_bytes=50 * 2**20, max_seconds=600.0, max_frames=36_000, max_pixels=1920 * 1080)


@dataclass(frozen=True)
class ServeOptions:
    """What the server accepts; the defaults are the safe ones (no remote or local file reads)."""

    model_name: str
    api_key: str | None = None
    allow_remote_images: bool = False
    allow_local_files: bool = False
    max_image_bytes: int = MAX_IMAGE_BYTES
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_image_memory: int = MAX_IMAGE_MEMORY  # decoded image bytes in flight, all requests together
    video: VideoLimits = VIDEO_LIMITS
    max_video_memory: int = 4 * 2**30  # decoded frames in flight, all requests together
    template: str | None = None  # None: the model's own
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header names; "*": any
    docs: bool = False  # FastAPI's /docs, /redoc and /openapi.json (never behind the API key)

    def max_body_bytes(self, video: bool) -> int:
        """A base64 image (a clip, for a `video` model: it takes no images) grows by 4/3; 1 MiB on
        top is ample for the text of a conversation."""
        return (self.video.max_bytes if video else self.max_image_bytes) * 4 // 3 + 2**20

    def limit(self, kind: str) -> tuple[int, str]:
        """The largest file of `kind` ("image" or "video") and the flag that sets it."""
        return (self.video.max_bytes, "--max-video-bytes") if kind == "video" else \
            (self.max_image_bytes, "--max-image-bytes")


class APIError(CogVLMError):
    """A request the server refuses, rendered as OpenAI's error JSON."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request parsing (no web framework here) ----------------------------------------------------

@dataclass
class Prepared:
    """A checked request, ready for `Scheduler.submit`."""

    prompt: PromptTokens
    params: SamplingParams
    stream: bool
    include_usage: bool


def prepare(vlm: CogVLM, opts: ServeOptions, body: Any, images: "ImageMemory", videos: "ImageMemory") -> Prepared:
    """Check a chat completion request and turn it into prompt tokens and sampling parameters.
    Blocking (image or video download and decoding): call it in a worker thread."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    check_fields(body)
    model = body.get("model")
    if model is not None and model != opts.model_name:
        raise APIError(f"model {_quote(model)} does not exist; this server serves {opts.model_name!r} "
                       f"(see GET /v1/models)", "model", "model_not_found", status=404)
    if _field(body, "n", int, "an integer") not in (None, 1):
        raise APIError("only n=1 is supported", "n", "unsupported_parameter")
    template = _field(body, "template", str, "a string") or opts.template
    if template is not None and template not in TEMPLATES:
        raise APIError(f"template must be one of {', '.join(TEMPLATES)}, not {_quote(template)}", "template",
                       "invalid_value")
    params = sampling_params(vlm, body)
    visual, query, history = parse_messages(body.get("messages"))
    stream = bool(_field(body, "stream", bool, "true or false"))
    stream_options = _field(body, "stream_options", dict, "an object") or {}
    if visual is None:
        prompt = _prompt(vlm, None, None, query, history, template)
    elif visual.kind == "video":
        prompt = _video_prompt(vlm, opts, visual, query, history, template, videos)
    else:
        prompt = _image_prompt(vlm, opts, visual, query, history, template, images)
    return Prepared(prompt, params, stream, stream and bool(stream_options.get("include_usage")))


def _image_prompt(vlm: CogVLM, opts: ServeOptions, visual: "Visual", query: str, history: list[tuple[str, str]],
                  template: str | None, images: "ImageMemory") -> PromptTokens:
    """The prompt of a conversation about an image, fetched and decoded within the image limits."""
    if vlm.config.video:
        raise APIError("this model takes videos, not images: send the clip as a "
                       "{\"type\": \"video_url\", \"video_url\": {\"url\": ...}} part", visual.where,
                       "image_not_supported")
    cross = vlm.config.cross_vision
    side = max(vlm.config.vision.image_size, 0 if cross is None else cross.image_size)
    fetched = fetch_image(visual.url, visual.where, opts, side)
    with images.reserve(fetched, visual.where):
        return _prompt(vlm, _decode(fetched[0], visual.where), None, query, history, template)


def _video_prompt(vlm: CogVLM, opts: ServeOptions, visual: "Visual", query: str, history: list[tuple[str, str]],
                  template: str | None, videos: "ImageMemory") -> PromptTokens:
    """The prompt of a conversation about a clip: fetched, checked from its header, then decoded
    and sampled by the template's rule (docs/spec/cogvlm2-video.md section 8) within the video
    limits; its decoded frames are reserved from `--max-video-memory` until they are preprocessed."""
    try:
        check_takes_video(vlm.config)
    except VideoError as e:
        raise APIError(str(e), visual.where, "video_not_supported") from None
    strategy = strategy_for(template or vlm.config.template)
    fetched = fetch_video(visual.url, visual.where, opts, strategy)
    with videos.reserve(fetched, visual.where):
        try:
            frames = decode_video(fetched[0], strategy, limits=opts.video, name="the video")
        except VideoError as e:
            raise APIError(str(e), visual.where, "invalid_video") from None
        return _prompt(vlm, None, frames, query, history, template)


def _prompt(vlm: CogVLM, image: Image.Image | None, frames: "torch.Tensor | None", query: str,
            history: list[tuple[str, str]], template: str | None) -> PromptTokens:
    """`vlm.prompt_tokens`, its named errors as 400s."""
    try:
        return vlm.prompt_tokens(image, query, history, template, video=frames)
    except TokenizerError as e:
        raise APIError(str(e), "messages", "invalid_text") from None
    except ImageRequiredError as e:  # CogAgent has no text-only mode
        raise APIError(str(e), "messages", "image_required") from None
    except VideoError as e:
        raise APIError(str(e), "messages", "invalid_video") from None


def check_fields(body: dict) -> None:
    """Refuse unknown fields and the OpenAI fields we cannot honour; see USED, IGNORED, NEUTRAL."""
    for key, value in body.items():
        if key in USED or key in EXTENSIONS or key in IGNORED:
            continue
        if key in NEUTRAL:
            if value in (None, NEUTRAL[key]):
                continue
            raise APIError(f"{key} is not supported by this server (only {json.dumps(NEUTRAL[key])})", key,
                           "unsupported_parameter")
        if key in UNSUPPORTED:
            if value in (None, False, [], {}):
                continue
            raise APIError(f"{key} is not supported by this server", key, "unsupported_parameter")
        raise APIError(f"unrecognized request field {_quote(key)}; this server takes {', '.join(USED + EXTENSIONS)} "
                       f"(see docs/serve.md)", key, "unknown_parameter")


def _quote(value: Any) -> str:
    """A client's value inside a message: JSON-quoted (so safe to print) and cut short."""
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(body: dict, key: str, kinds: type | tuple[type, ...], what: str) -> Any:
    """body[key] (None when absent) after a type check; JSON true is not a number here."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kinds) or (isinstance(value, bool) and kinds is not bool):
        raise APIError(f"{key} must be {what}, not {_quote(value)}", key, "invalid_type")
    return value


def sampling_params(vlm: CogVLM, body: dict) -> SamplingParams:
    """OpenAI's knobs mapped to the engine's, on top of `vlm.defaults` (the authors' settings
    unless `cogvlm serve` got sampling flags). temperature 0: greedy. Otherwise OpenAI semantics: sample from the whole
    distribution (top_k 0), temperature and top_p default to 1. `top_k` and `repetition_penalty`
    are accepted as extensions, as vLLM does."""
    number = (int, float)
    temperature = _field(body, "temperature", number, "a number")
    top_p = _field(body, "top_p", number, "a number")
    kw: dict[str, Any] = {}
    if temperature is not None or top_p is not None:
        kw = {"top_k": 0, "temperature": 1.0 if temperature is None else temperature,
              "top_p": 1.0 if top_p is None else top_p}
    top_k = _field(body, "top_k", int, "an integer")
    if top_k is not None:
        kw["top_k"] = top_k
    max_tokens = _field(body, "max_completion_tokens", int, "an integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", int, "an integer")
    stop = _field(body, "stop", (str, list), "a string or a list of strings")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise APIError("stop must be a string or a list of strings", "stop", "invalid_type")
    kw.update(max_new_tokens=max_tokens, stop=stop,
              seed=_field(body, "seed", int, "an integer"),
              repetition_penalty=_field(body, "repetition_penalty", number, "a number"))
    try:
        return vlm.sampling(**kw)
    except ValueError as e:  # "invalid NAME=VALUE: why"
        name = re.match(r"invalid (\w+)=", str(e))
        api = API_NAMES.get(name.group(1), name.group(1)) if name else None
        message = str(e).replace(f"{name.group(1)}=", f"{api}=", 1) if name else str(e)
        raise APIError(message, api, "invalid_value") from None


@dataclass(frozen=True)
class Visual:
    """A conversation's picture or clip: its URL, the param path errors name, "image" or "video"."""

    url: str
    where: str
    kind: str


def parse_messages(messages: Any) -> tuple[Visual | None, str, list[tuple[str, str]]]:
    """OpenAI messages -> (the image or video, if any; query; history pairs).

    CogVLM has no system prompt, so system/developer messages are ignored; the rest must
    alternate user/assistant and end with the user's question. One image or one video per
    conversation, in any user message (the model sees it before the first turn either way)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list", "messages")
    turns: list[tuple[str, str]] = []
    visuals: list[Visual] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"{where} must be an object with role and content", where)
        role = message.get("role")
        if role in ("system", "developer"):
            continue
        if role not in ("user", "assistant"):
            raise APIError(f"{where} has role {_quote(role)}; CogVLM takes user and assistant messages "
                           f"(system messages are ignored)", f"{where}.role")
        text, found = _content(message.get("content"), f"{where}.content")
        if role == "assistant" and found:
            raise APIError("images and videos go in user messages", f"{where}.content")
        visuals += found
        turns.append((role, text))
    if not any(role == "user" for role, _ in turns):
        raise APIError("the request has no user message", "messages", "missing_user_message")
    roles = [role for role, _ in turns]
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise APIError("messages must alternate user and assistant, starting and ending with a user "
                       "message", "messages", "invalid_message_order")
    kinds = {v.kind for v in visuals}
    if len(kinds) > 1:
        raise APIError("a conversation holds an image or a video, not both", visuals[1].where, "image_and_video")
    if len(visuals) > 1:
        kind = visuals[0].kind
        raise APIError(f"CogVLM takes one {kind} per conversation; this request has {len(visuals)}",
                       visuals[1].where, f"too_many_{kind}s")
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
    return (visuals[0] if visuals else None), turns[-1][1], history


def _content(content: Any, where: str) -> tuple[str, list[Visual]]:
    """A message's text (parts joined by newlines) and its image or video URLs."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise APIError(f"{where} must be a string or a list of content parts", where)
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "video_url"):
            url = part.get(kind)
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise APIError(f"{at}.{kind} must be {{\"url\": \"...\"}}", f"{at}.{kind}")
            urls.append(Visual(url, f"{at}.{kind}", kind.removesuffix("_url")))
        else:
            raise APIError(f"{at} must be {{\"type\": \"text\", \"text\": ...}}, "
                           f"{{\"type\": \"image_url\", \"image_url\": {{\"url\": ...}}}} or "
                           f"{{\"type\": \"video_url\", \"video_url\": {{\"url\": ...}}}}", at)
    return "\n".join(texts), urls


def fetch_image(url: str, where: str, opts: ServeOptions, side: int) -> tuple[bytes, int]:
    """The image file behind a data:, http(s) or local URL, within the size limits, and the bytes
    decoding it and resizing it to `side` x `side` will take."""
    data = fetch(url, where, opts, "image")
    return data, _decoded_size(data, where, opts.max_image_pixels, side)


def fetch_video(url: str, where: str, opts: ServeOptions, strategy: str) -> tuple[bytes, int]:
    """The clip behind a data:, http(s) or local URL, within the byte limit, its header within the
    pixel and duration limits, and the bytes decoding and preprocessing its sampled frames take."""
    data = fetch(url, where, opts, "video")
    try:
        header = probe_video(data, "the video")
    except VideoError as e:
        raise APIError(str(e), where, "invalid_video") from None
    pixels = header.width * header.height
    if pixels > opts.video.max_pixels:
        raise _too_big(f"the video is {header.width}x{header.height} pixels a frame", where, "--max-video-pixels",
                       "video")
    if header.seconds is not None and header.seconds > opts.video.max_seconds:
        raise APIError(f"the video lasts {header.seconds:.1f} s, over this server's limit of "
                       f"{opts.video.max_seconds:g} s (--max-video-seconds)", where, "video_too_long")
    return data, frames_memory(header.seconds, strategy) * pixels * DECODED_BYTES_PER_PIXEL


# A sampled frame's bytes per pixel until preprocessing is done: the decoded RGB frame and its
# copy in the stacked clip (3 + 3, uint8), the clip / 255 and its normalised copy (12 + 12, float32)
DECODED_BYTES_PER_PIXEL = 30


def frames_memory(seconds: float | None, strategy: str) -> int:
    """Frames a clip of `seconds` yields: the chat rule one a second (ends included), at most
    NUM_FRAMES; the base rule always NUM_FRAMES (docs/spec/cogvlm2-video.md section 8)."""
    if strategy == "base" or seconds is None:
        return NUM_FRAMES
    return min(NUM_FRAMES, int(seconds) + 2)


def fetch(url: str, where: str, opts: ServeOptions, kind: str) -> bytes:
    """The file of `kind` ("image" or "video") behind a data:, http(s) or local URL, within its
    byte limit; remote and local sources only where the server allows them."""
    limit, flag = opts.limit(kind)
    hint = (f"send the {kind} inline as a data: URL (data:{MIME[kind]};base64,...); http(s) URLs need "
            f"--allow-remote-images, local paths need --allow-local-files")
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(f"{kind} data URLs must be base64: data:{MIME[kind]};base64,...", where,
                           f"invalid_{kind}_url")
        payload = "".join(payload.split())
        if len(payload) // 4 * 3 > limit + 3:
            raise _too_big(f"the {kind} is about {len(payload) // 4 * 3} bytes", where, flag, kind)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(f"the {kind} data URL is not valid base64", where, "invalid_base64") from None
    elif url.startswith(("http://", "https://")):
        if not opts.allow_remote_images:
            raise APIError(f"remote {kind} URLs are off on this server: {hint}", where, f"{kind}_url_not_allowed")
        data = _download(url, where, limit, kind)
    else:
        if not opts.allow_local_files:
            raise APIError(f"local {kind} paths are off on this server: {hint}", where, f"{kind}_url_not_allowed")
        data = _read_local(url.removeprefix("file://"), where, limit, kind)
    if len(data) > limit:
        raise _too_big(f"the {kind} is {len(data)} bytes", where, flag, kind)
    return data


def _too_big(what: str, where: str | None, flag: str, kind: str = "image") -> APIError:
    return APIError(f"{what}, over this server's limit ({flag})", where, f"{kind}_too_large", status=413)


DOWNLOAD_SECONDS = 10.0  # a whole image download, connection included: a byte every second must not beat it
READ_SECONDS = 2.0  # one socket read: how far past DOWNLOAD_SECONDS a silent server can take a download
MAX_DOWNLOADS = 8  # remote images and videos fetched at once: the rest get a 429, not a worker thread each
_downloads = threading.BoundedSemaphore(MAX_DOWNLOADS)


def _download(url: str, where: str, limit: int, kind: str = "image", seconds: float = DOWNLOAD_SECONDS) -> bytes:
    """At most `limit` + 1 bytes of `url` within `seconds` in all. urllib's timeout bounds each
    socket read, not the whole: a server dripping one byte a second never trips it, and each
    such request held a worker thread for as long as the drip lasted (40 of them, every worker)."""
    if not _downloads.acquire(blocking=False):
        raise APIError(f"this server is downloading {MAX_DOWNLOADS} files already; retry shortly", where,
                       f"{kind}_downloads_busy", status=429)
    deadline = time.monotonic() + seconds
    try:
        with urllib.request.urlopen(url, timeout=min(seconds, READ_SECONDS)) as response:
            data = bytearray()
            while len(data) <= limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"not downloaded within {seconds:g} s")
                part = response.read1(min(2**16, limit + 1 - len(data)))  # what has come, not 64 kB
                if not part:
                    break
                data += part
            return bytes(data)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise APIError(f"could not download the {kind} {_quote(url)}: {e}", where, f"{kind}_download_failed") from None
    finally:
        _downloads.release()


def _read_local(name: str, where: str, limit: int, kind: str = "image") -> bytes:
    """A regular file's bytes (`image.read_file`: /dev/zero, FIFOs and folders are refused unread)."""
    try:
        return read_file(Path(name).expanduser(), limit, kind)
    except ImageTooLargeError:
        raise _too_big(f"{_quote(name)} is over {limit} bytes", where, f"--max-{kind}-bytes", kind) from None
    except ImageError as e:
        raise APIError(f"could not read the {kind}: {str(e)[:300]}", where, f"{kind}_not_found") from None


def _decoded_size(data: bytes, where: str, max_pixels: int, side: int) -> int:
    """`image.decoded_bytes` (the header's size and shape, before decoding) as the API's errors."""
    try:
        return decoded_bytes(data, max_pixels, side)
    except ImageTooLargeError as e:
        raise _too_big(str(e), where, "--max-image-pixels") from None
    except ImageError as e:
        raise APIError(str(e), where, "invalid_image") from None


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        return load_image(data)
    except ImageError as e:
        raise APIError(str(e).replace("the given bytes", "the image"), where, "invalid_image") from None


class ImageMemory:
    """Admission control for decoding: the bytes that decoded images (or, a second budget, the
    decoded frames of videos) of concurrent requests may take together (`--max-image-memory`,
    `--max-video-memory`). The per-file limits alone let 40 concurrent large images take
    gigabytes; here a request waits (up to `wait` seconds, then 429) for room."""

    def __init__(self, limit: int, wait: float = 10.0, kind: str = "image") -> None:
        self.limit, self.wait, self.used, self.kind = limit, wait, 0, kind
        self._room = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, fetched: tuple[bytes, int] | None, where: str | None) -> Iterator[None]:
        """Hold `fetched`'s decoded bytes (its second item) of the budget for the block."""
        need, kind = 0 if fetched is None else fetched[1], self.kind
        if need > self.limit:
            raise _too_big(f"decoding the {kind} takes about {need} bytes", where, f"--max-{kind}-memory", kind)
        with self._room:
            if not self._room.wait_for(lambda: self.used + need <= self.limit, timeout=self.wait):
                raise APIError(f"the server is decoding too many {kind}s at once (--max-{kind}-memory); retry "
                               "shortly", where, f"{kind}_memory_busy", status=429)
            self.used += need
        try:
            yield
        finally:
            with self._room:
                self.used -= need
                self._room.notify_all()


# ---- responses -------------------------------------------------------------------------------

def usage(job: Job) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


def sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class RequestLog:
    """Requests submitted through this server, counted by how they ended (for /metrics). Only the
    event loop thread touches it; finished jobs are folded into the counts on the next call."""

    def __init__(self) -> None:
        self.live: list[Job] = []
        self.ended: Counter[str] = Counter()
        self.completion_tokens = 0

    def add(self, job: Job) -> None:
        self._fold()
        self.live.append(job)

    def snapshot(self) -> dict[str, Any]:
        self._fold()
        return {"running": len(self.live), "finished": dict(self.ended),
                "completion_tokens": self.completion_tokens}

    def _fold(self) -> None:
        running = []
        for job in self.live:
            if job.finish_reason is None:
                running.append(job)
            else:
                self.ended[job.finish_reason] += 1
                self.completion_tokens += job.completion_tokens
        self.live = running


def _settle(job: Job) -> None:
    """Wait for the job to end; its error, if any, stays on `job.error`."""
    with contextlib.suppress(Exception):
        job.result()


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")  # as they appear in Host headers


def is_loopback(host: str) -> bool:
    """`--host` is reachable from this machine only: localhost, all of 127.0.0.0/8, ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def loopback_hosts(host: str) -> tuple[str, ...]:
    """The Host header names a loopback server answers to: the usual ones and its own address."""
    name = f"[{host.strip('[]')}]" if ":" in host else host.lower()
    return LOOPBACK_HOSTS if name in LOOPBACK_HOSTS else (*LOOPBACK_HOSTS, name)


def key_matches(header: str, key: str) -> bool:
    """`Authorization: Bearer <key>`, the scheme in any case (RFC 7235). Starlette decodes header
    bytes as Latin-1, so they are compared as the bytes sent against the key's UTF-8: a
    non-ASCII key could never match a decoded string's UTF-8."""
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("latin-1", "replace"), key.encode("utf-8"))
ENDPOINTS = "POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics"


def json_response(body: dict[str, Any], status: int) -> Any:
    """JSON with non-ASCII escaped: an error may quote a client's string with a lone surrogate,
    which has no UTF-8 form (Starlette's JSONResponse would fail on it with a 500)."""
    from starlette.responses import Response

    return Response(json.dumps(body), status_code=status, media_type="application/json")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """The Host header's name (port dropped) is one of `allowed`: refuses DNS rebinding, where a
    web page's own name resolves to 127.0.0.1 and its scripts then talk to a local server."""
    if "*" in allowed:
        return True
    name = host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
    return name.lower() in allowed


HEADER_SECONDS = 10.0  # from connecting (or the last response) to a request's complete headers
BODY_SECONDS = 20.0  # reading a request body whole
KEEP_ALIVE_SECONDS = 5  # an idle kept-alive connection
MAX_HEADER_BYTES = 64 * 2**10  # a request line and headers, together
LOG_BURST, LOG_WINDOW = 20, 60.0  # the same log message at most LOG_BURST times a LOG_WINDOW (seconds)


def server_settings() -> dict[str, Any]:
    """uvicorn.Config arguments that keep connections from outliving their use: a client that
    connects and never finishes its headers is dropped after HEADER_SECONDS (uvicorn has no such
    timeout: 1,100 idle connections exhausted a 1,024-file limit and locked everyone out),
    headers are capped at MAX_HEADER_BYTES, idle keep-alives close after KEEP_ALIVE_SECONDS, and
    past `limit_concurrency` connections new requests get 503s instead of file descriptors.
    Raises the process's open-file limit to its hard limit first; installs `RateLimit` on the
    loggers that a flood of bad connections writes to (the log grew 382 MB in 70 s)."""
    import resource

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        """uvicorn's h11 protocol, closing a connection whose next request's headers are not
        complete HEADER_SECONDS after it opened or after its last response."""

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            waiting_on = self.cycle  # a new request replaces it once its headers are in
            self.loop.call_later(HEADER_SECONDS, lambda: self.cycle is waiting_on and self.transport.close())

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    limit = RateLimit(LOG_BURST, LOG_WINDOW)
    for name in ("uvicorn.error", "uvicorn.access", "asyncio", "cogvlm.scheduler"):
        logging.getLogger(name).addFilter(limit)
    files = 65536 if soft == resource.RLIM_INFINITY else soft
    return {"http": HeaderTimeout, "ws": "none", "timeout_keep_alive": KEEP_ALIVE_SECONDS,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES, "limit_concurrency": max(16, min(4096, files - 64))}


class RateLimit(logging.Filter):
    """Lets each message (by its format string) through at most `burst` times per `window`
    seconds, then once more with a count of what was dropped when the window turns."""

    def __init__(self, burst: int, window: float) -> None:
        super().__init__()
        self.burst, self.window = burst, window
        self.seen: dict[tuple[str, object], tuple[float, int]] = {}  # message -> (window start, count)

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, record.msg), time.monotonic()
        start, count = self.seen.get(key, (now, 0))
        if now - start >= self.window:
            if count > self.burst:
                record.msg = f"{record.msg} [{count - self.burst} more like this in {self.window:g} s not logged]"
            start, count = now, 0
        if len(self.seen) > 1000:  # messages with the client in their format string: no unbounded growth
            self.seen.clear()
        self.seen[key] = (start, count + 1)
        return count < self.burst


def create_app(vlm: CogVLM, opts: ServeOptions, max_batch: int = 16,
               on_failure: Callable[[], None] | None = None) -> "FastAPI":
    """The ASGI app. Its scheduler thread is closed when the app shuts down. When the model
    stops for good (a tensor-parallel rank failed) every request is answered 503 and
    `on_failure` is called (`cogvlm serve` then exits); `app.state.scheduler.failure` says why."""
    import anyio
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    scheduler = Scheduler(vlm, max_batch, on_failure)
    requests = RequestLog()
    images = ImageMemory(opts.max_image_memory)
    videos = ImageMemory(opts.max_video_memory, kind="video")

    def require_key(request: Request) -> None:
        if opts.api_key is None:
            return
        if not key_matches(request.headers.get("authorization", ""), opts.api_key):
            raise APIError("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", status=401)

    protected = [Depends(require_key)]

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        scheduler.close()

    docs = {} if opts.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="cogvlm", lifespan=lifespan, **docs)
    app.state.scheduler = scheduler

    @app.middleware("http")
    async def check_host(request: Request, call_next: Any) -> Any:
        host = request.headers.get("host", "")
        if not host_allowed(host, opts.allowed_hosts):
            error = APIError(f"Host {_quote(host)} is not allowed here (--allowed-hosts)", code="invalid_host")
            return json_response(error.body(), 400)
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> Any:
        return json_response(e.body(), e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> Any:
        if e.status_code == 404:
            message = (f"Invalid URL ({request.method} {_quote(request.url.path)}): this server serves "
                       f"{ENDPOINTS}")
            return json_response(APIError(message, code="unknown_url", status=404).body(), 404)
        return json_response(APIError(str(e.detail), status=e.status_code).body(), e.status_code)

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> Any:
        body = APIError(f"internal error ({type(e).__name__}); see the server log", kind="server_error").body()
        return json_response(body, 500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "model": opts.model_name}

    @app.get("/v1/models", dependencies=protected)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": opts.model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "cogvlm"}]}

    @app.get("/metrics", dependencies=protected)
    async def metrics() -> dict[str, Any]:
        # dict() is one C-level copy while the scheduler thread keeps counting; size 0 counts the
        # last step of a batch, after its rows ended: not a batch
        sizes = dict(scheduler.batch_sizes)
        return {"max_batch": scheduler.max_batch, "max_batch_seen": max(sizes, default=0),
                "batch_sizes": {str(k): sizes[k] for k in sorted(sizes)}, "requests": requests.snapshot()}

    @app.post("/v1/chat/completions", dependencies=protected, response_model=None)
    async def chat_completions(request: Request) -> Any:
        body = await _read_json(request, opts.max_body_bytes(vlm.config.video))
        ready = await run_in_threadpool(prepare, vlm, opts, body, images, videos)
        try:
            job = scheduler.submit(ready.prompt, ready.params)
        except ContextLengthError as e:
            raise APIError(str(e), "messages", "context_length_exceeded") from None
        except TensorParallelError as e:
            raise APIError(f"the model stopped: {e}", kind="server_error", status=503) from None
        requests.add(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": opts.model_name}
        if ready.stream:
            return StreamingResponse(_events(job, head, ready.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        await _wait(request, job)
        if job.error is not None:
            if job.busy:
                raise APIError(f"the server has no memory for this request now: {job.error}", code="server_busy",
                               kind="server_error", status=503)
            raise APIError(f"generation failed: {job.error}", kind="server_error", status=503 if job.stopped else 500)
        return {**head, "object": "chat.completion", "usage": usage(job),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": job.answer},
                             "finish_reason": job.finish_reason, "logprobs": None}]}

    async def _wait(request: Request, job: Job) -> None:
        """Wait for a non-streamed answer; a client that hangs up cancels its job."""
        async def cancel_on_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(cancel_on_disconnect)
            await anyio.to_thread.run_sync(_settle, job, abandon_on_cancel=True)
            tasks.cancel_scope.cancel()

    async def _events(job: Job, head: dict[str, Any], include_usage: bool) -> AsyncIterator[str]:
        """OpenAI chunks as server-sent events. When the client goes away, Starlette cancels
        this generator at its await: `finally` cancels the job and frees its batch slot."""
        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            return sse({**head, "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        pieces = job.pieces()
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (piece := await anyio.to_thread.run_sync(next, pieces, None, abandon_on_cancel=True)) is not None:
                yield chunk({"content": piece})
            yield chunk({}, job.finish_reason)
            if include_usage:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage(job)})
        except Exception as e:  # the engine failed mid-answer: tell the client in-band
            yield sse(APIError(f"generation failed: {e}", kind="server_error").body())
        finally:
            job.cancel()  # no-op for a finished job
        yield sse("[DONE]")

    return app


async def _read_json(request: "Request", limit: int) -> Any:
    """The body as JSON: only `application/json` (a web page may send text/plain to any server
    without asking it first), oversized bodies refused before they are read whole, and no
    numbers or nesting that Python cannot parse or that no request needs (`_parse_json`)."""
    import anyio

    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(f"the request body must be sent as Content-Type: application/json, not "
                       f"{_quote(media_type or 'none')}", code="unsupported_media_type", status=415)
    declared = request.headers.get("content-length", "")
    too_big = APIError(f"the request body is over {limit} bytes (raise --max-image-bytes or --max-video-bytes for "
                       f"bigger images or videos)",
                       code="request_too_large", status=413)
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    raw = bytearray()
    try:
        with anyio.fail_after(BODY_SECONDS):  # a client that sends a byte now and then holds a connection
            async for part in request.stream():
                raw += part
                if len(raw) > limit:
                    raise too_big
    except TimeoutError:
        raise APIError(f"the request body did not arrive within {BODY_SECONDS:g} s", code="request_timeout",
                       status=408) from None
    return await anyio.to_thread.run_sync(_parse_json, bytes(raw), PARSE_SECONDS)


def _parse_json(raw: bytes, seconds: float) -> Any:
    """Parse and check a body, in a worker thread, within `seconds`. Python's C parser holds the
    GIL throughout, so a thread alone does not keep the event loop going: a body of 10 million
    `[]` froze /health and every stream for 7 s to parse and 26 s to check its depth. So JSON's
    structural characters are counted first (C `bytes.count`, milliseconds) and capped at
    MAX_JSON_TOKENS; the parse hooks and the depth walk then stop at the deadline."""
    tokens = sum(raw.count(c) for c in (b"[", b"{", b",", b":"))
    if tokens > MAX_JSON_TOKENS:
        raise APIError(f"the request body has {tokens} JSON values; at most {MAX_JSON_TOKENS} are taken",
                       code="json_too_large", status=413)
    deadline = time.monotonic() + seconds

    def in_time(value: Any) -> Any:
        if time.monotonic() > deadline:
            raise APIError(f"the request body took over {seconds:g} s to parse", code="json_too_large", status=413)
        return value

    too_deep = APIError(f"the request body nests deeper than {MAX_JSON_DEPTH} levels", code="json_too_deep")
    try:
        body = json.loads(raw, parse_int=lambda t: in_time(_parse_int(t)), parse_float=lambda t: in_time(_parse_float(t)),
                          parse_constant=_parse_constant, object_pairs_hook=lambda pairs: in_time(dict(pairs)))
    except RecursionError:
        raise too_deep from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if _depth(body, in_time) > MAX_JSON_DEPTH:
        raise too_deep
    return body


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise APIError(f"the request has an integer of {len(text)} digits; at most {MAX_INT_DIGITS} are taken",
                       code="number_too_large")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise APIError(f"the request has a number out of range: {_quote(text)}", code="number_too_large")
    return value


def _parse_constant(text: str) -> float:
    raise APIError(f"{text} is not JSON", code="invalid_json")


def _depth(value: Any, in_time: Callable[[Any], Any]) -> int:
    """How deep arrays and objects nest in `value`, without recursion; `in_time` is asked every
    4,096 items (it raises past the deadline)."""
    deepest, stack, seen = 0, [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen % 4096 == 0:
            in_time(None)
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest
