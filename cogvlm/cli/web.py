"""`cogvlm web`: the Gradio demo. Upload or paste an image (or none), chat with streamed answers,
pick the template and sampling settings, and see the turn's grounding boxes drawn on the image. A
video model (CogVLM2-Video) shows a video upload instead, and its clips are read within the same
limits as the server's (`--max-video-bytes` ...; docs/serve.md).

Gradio is an optional extra (`pip install 'cogvlm[web]'`), imported only when the demo starts.
Prompting and decoding stay in the API: each browser tab holds one `ChatSession`, and a
`SessionPool` keeps at most `--max-sessions` of them, because each keeps a full-context KV cache
(1-1.8 GiB on the published models) that a few idle tabs would otherwise pile up on the card; a
conversation idle for `--session-idle` seconds, or whose tab closed, is dropped too.

Uploads are what `cogvlm serve` accepts (image.py's limits, the same checks): Gradio hands over the
uploaded file unopened (type="filepath"), its size and header are checked before it is decoded,
and Gradio refuses larger uploads itself (max_file_size). Uploads live in a folder of this run,
swept of files older than the idle time and removed when the demo stops.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, TypeVar

from PIL import Image

from ..config import TEMPLATES
from ..errors import ImageError, ImageRequiredError, ImageTooLargeError, UsageError, VideoError
from ..grounding import draw_boxes, drawable, turn_boxes
from ..image import MAX_IMAGE_BYTES, MAX_IMAGE_MEMORY, MAX_IMAGE_PIXELS, decoded_bytes, load_image, read_file
from ..server import VIDEO_LIMITS
from ..video import VideoLimits, decode_video, pyav, read_video, strategy_for
from .flags import (add_model_flags, listen_socket, load_model, load_options, port, positive_float, positive_int,
                    sampling_flags)
from .serve import add_video_limit_flags, video_limits

if TYPE_CHECKING:
    import gradio as gr

    from ..api import ChatSession, CogVLM

EXAMPLES = Path(__file__).parent.parent / "web_examples"
INTRO = ("# CogVLM\nUpload or paste an image (or none, for text-only chat) and ask about it. Boxes written "
         "as `[[x0,y0,x1,y1]]` (thousandths of the image size) in a question or an answer are drawn on "
         "the image below it. Changing the image or the template starts a new conversation.")
VIDEO_INTRO = ("# CogVLM2-Video\nUpload a clip (or none, for text-only chat) and ask about it. In the chat "
               "template the model sees a frame per second (at most 24); in base, 24 frames over the first "
               "minute. Changing the clip or the template starts a new conversation.")
CLOSED = "This conversation was closed to free memory (other tabs started newer ones); it starts over."
# Three caches fit a 24 GB card beside every published model in int4 (`cogvlm plan --quant 4`,
# which counts one cache, leaves room for 2.75 more of CogVLM2's 1 GiB at 8K, 2.8 of CogAgent's
# 1.8 GiB, 6.5 of CogVLM's 1 GiB): the default suits the smallest card the demo is run on.
DEFAULT_MAX_SESSIONS = 3
DEFAULT_IDLE = 900.0  # seconds a conversation (and an upload) is kept without use
SWEEP_SECONDS = 60  # how often idle conversations and old uploads are looked for


@dataclass(frozen=True)
class UploadLimits:
    """What an uploaded image may be: `cogvlm serve`'s limits (image.py), by the same checks."""

    max_bytes: int = MAX_IMAGE_BYTES
    max_pixels: int = MAX_IMAGE_PIXELS
    max_memory: int = MAX_IMAGE_MEMORY


def open_upload(path: str, limits: UploadLimits, side: int) -> tuple[Image.Image, str]:
    """The uploaded file decoded, and a digest of its bytes (the conversation's key), after the
    checks `cogvlm serve` makes: a regular file within max_bytes, a header within max_pixels and
    50:1, and what decoding and resizing take within max_memory; ImageError says which failed."""
    try:
        data = read_file(Path(path), limits.max_bytes)
    except ImageTooLargeError:
        raise ImageTooLargeError(f"the image is over {limits.max_bytes} bytes, this demo's limit "
                                 f"(--max-image-bytes)") from None
    try:
        need = decoded_bytes(data, limits.max_pixels, side)
    except ImageTooLargeError as e:
        raise ImageTooLargeError(f"{e}, over this demo's limit (--max-image-pixels)") from None
    if need > limits.max_memory:
        raise ImageTooLargeError(f"decoding the image takes about {need} bytes, over this demo's limit "
                                 f"(--max-image-memory)")
    return load_image(data), hashlib.sha1(data).hexdigest()


@dataclass(frozen=True)
class Example:
    """One clickable example: an image (or a clip, for video models), a prompt, the template it
    suits and a short label."""

    image: Path | None
    prompt: str
    template: str
    label: str
    video: Path | None = None

    @property
    def file(self) -> Path:
        return self.image or self.video  # type: ignore[return-value]  (load_examples sets one)


def load_examples(folder: Path) -> list[Example]:
    """The entries of `folder/examples.json`, checked so a broken folder fails at start-up; each
    names an `image` or a `video`."""
    index = folder / "examples.json"
    try:
        rows = json.loads(index.read_text())
        examples = [_example(folder, r) for r in rows]
    except FileNotFoundError:
        raise UsageError(f"no examples.json in {folder}") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UsageError(f"{index} must be a JSON list of {{image or video, prompt, template, label}} objects "
                         f"({e!r})") from None
    for ex in examples:
        if not ex.file.is_file():
            raise UsageError(f"{index}: {'video' if ex.video else 'image'} not found: {ex.file}")
        if ex.template not in TEMPLATES:
            raise UsageError(f"{index}: unknown template {ex.template!r}; expected one of {TEMPLATES}")
    return examples


def _example(folder: Path, row: dict) -> Example:
    if ("image" in row) == ("video" in row):
        raise KeyError("image or video (one of them)")
    image, video = (folder / row[k] if k in row else None for k in ("image", "video"))
    return Example(image, row["prompt"], row["template"], row["label"], video)


Session = TypeVar("Session")


class SessionPool(Generic[Session]):
    """The conversations that keep their KV cache: at most `capacity`, the least recently used
    one dropped when a new one opens, and none unused for more than `idle` seconds (a tab left
    open, or closed without Gradio noticing, must not hold its cache for good). Tabs hold only an
    id; the pool holds the only reference to each session, so dropping it frees its cache. A tab
    whose id is gone is told so and starts over. Locked: Gradio runs handlers on worker threads
    (Clear and uploads beside an answer)."""

    def __init__(self, capacity: int, idle: float = DEFAULT_IDLE, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise UsageError(f"--max-sessions must be >= 1, not {capacity}")
        self.capacity, self.idle, self.clock = capacity, idle, clock
        self._sessions: OrderedDict[int, tuple[Session, float]] = OrderedDict()  # oldest use first
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def open(self, session: Session) -> int:
        """Keep `session` as the most recently used; returns its id."""
        with self._lock:
            self._expire()
            key = next(self._ids)
            self._sessions[key] = (session, self.clock())
            while len(self._sessions) > self.capacity:
                self._sessions.popitem(last=False)
            return key

    def get(self, key: int) -> Session | None:
        """The session, now the most recently used; None once it was dropped."""
        with self._lock:
            self._expire()
            entry = self._sessions.pop(key, None)
            if entry is None:
                return None
            self._sessions[key] = (entry[0], self.clock())
            return entry[0]

    def close(self, key: int) -> None:
        with self._lock:
            self._sessions.pop(key, None)

    def expire(self) -> None:
        """Drop the sessions unused for more than `idle` seconds (a sweeper calls it too)."""
        with self._lock:
            self._expire()

    def _expire(self) -> None:
        oldest = self.clock() - self.idle
        while self._sessions and next(iter(self._sessions.values()))[1] < oldest:
            self._sessions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._sessions)


@dataclass(frozen=True)
class Conversation:
    """One browser tab's chat: its session's id in the pool and what it was started for (an
    image's or a clip's digest and a template)."""

    id: int
    key: tuple[str, str]


def read_clip(path: str, limits: VideoLimits) -> tuple[bytes, str]:
    """The uploaded clip's bytes, read within `limits.max_bytes` (Gradio refuses larger uploads
    itself too), and their digest (the conversation's key)."""
    data, _ = read_video(path, limits.max_bytes)
    return data, "video:" + hashlib.sha1(data).hexdigest()


def _messages(history: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"role": role, "content": text} for q, a in history for role, text in (("user", q), ("assistant", a))]


def build_app(vlm: CogVLM, examples: list[Example], template: str | None = None,
              pool: SessionPool[ChatSession] | None = None, limits: UploadLimits = UploadLimits(),
              clip_limits: VideoLimits = VIDEO_LIMITS) -> gr.Blocks:
    """The demo's page; the model's sampling defaults (from the flags) set the starting values of
    the controls; `pool` (default: `DEFAULT_MAX_SESSIONS` places) holds the tabs' conversations;
    `limits` are what an uploaded image may be. A video model gets a video upload, its clips read
    within `clip_limits`, and the video examples; other models the image input and the image
    examples. Both uploads reach the handler as files, unopened."""
    import gradio as gr

    start = vlm.defaults
    pool = SessionPool(DEFAULT_MAX_SESSIONS) if pool is None else pool
    cross = vlm.config.cross_vision
    side = max(vlm.config.vision.image_size, 0 if cross is None else cross.image_size)
    takes_video = vlm.config.video
    examples = [e for e in examples if (e.video is not None) == takes_video]

    def open_upload_of(upload: str | None) -> tuple[Image.Image | bytes | None, str]:
        """The upload (an image decoded after the server's checks, or a clip's bytes) and its digest."""
        if not upload:
            return None, "none"
        try:
            return read_clip(upload, clip_limits) if takes_video else open_upload(upload, limits, side)
        except (ImageError, VideoError) as e:
            raise gr.Error(str(e).replace(upload, "the clip")) from None

    def open_session(media: Image.Image | bytes | None, template: str) -> ChatSession:
        """A conversation about the image or the clip (decoded and sampled by the template's rule)."""
        try:
            if isinstance(media, bytes):
                clip = decode_video(media, strategy_for(template), limits=clip_limits, name="the clip")
                return vlm.session(None, template, video=clip)
            return vlm.session(media, template)
        except (ImageRequiredError, VideoError) as e:  # CogAgent has no text-only chat; a clip we cannot read
            raise gr.Error(str(e)) from None

    def respond(upload: str | None, query: str, convo: Conversation | None, template: str,
                temperature: float, top_p: float, top_k: float, max_new_tokens: float) -> Iterator[tuple]:
        query = query.strip()
        if not query and template != "base":
            raise gr.Error("Type a question first (an empty prompt means captioning, with the base template).")
        media, digest = open_upload_of(upload)
        key = (digest, template)
        session = pool.get(convo.id) if convo is not None else None
        if convo is not None and convo.key == key and session is None:
            gr.Warning(CLOSED)
        if session is None or convo.key != key:
            if convo is not None:
                pool.close(convo.id)  # a new image, clip or template: the old conversation's cache goes now
            session = open_session(media, template)
            convo = Conversation(pool.open(session), key)
        chat = _messages(session.history) + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        settings = dict(temperature=temperature, top_p=top_p, top_k=int(top_k),
                        max_new_tokens=int(max_new_tokens) or None)
        try:
            for piece in session.stream(query, **settings):
                chat[-1]["content"] += piece
                yield chat, convo, None, ""
        except ValueError as e:  # no room left in max_length, or a bad setting
            raise gr.Error(str(e)) from None
        image = media if isinstance(media, Image.Image) else None  # boxes are drawn on images only
        phrases = turn_boxes(query, session.history[-1][1]) if image is not None else []
        yield _messages(session.history), convo, draw_boxes(drawable(image), phrases) if phrases else None, ""

    # uploads (and drawn boxes) older than the idle time are deleted every SWEEP_SECONDS
    with gr.Blocks(title="CogVLM", analytics_enabled=False, delete_cache=(SWEEP_SECONDS, int(pool.idle))) as app:
        gr.Markdown(VIDEO_INTRO if takes_video else INTRO)
        # Gradio drops a tab's state when the tab closes or after `idle` seconds unused: its cache goes too
        convo = gr.State(None, time_to_live=pool.idle, delete_callback=lambda c: c is not None and pool.close(c.id))
        with gr.Row():
            with gr.Column(scale=1):
                if takes_video:  # the upload passes its file's path; include_audio: no ffmpeg re-encode
                    media = gr.Video(sources=["upload"], label="Video", elem_id="video", include_audio=True)
                else:  # the file, unopened (image_mode None: Gradio converts nothing): open_upload checks it first
                    media = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], label="Image",
                                     elem_id="image")
                boxes = gr.Image(type="pil", format="png", label="Boxes", interactive=False, elem_id="boxes",
                                 visible=not takes_video)
                template_box = gr.Dropdown(list(TEMPLATES), value=template or vlm.config.template,
                                           label="Template", elem_id="template")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0, 2, value=start.temperature, step=0.05, label="temperature",
                                            info="0 = greedy")
                    top_p = gr.Slider(0.01, 1, value=start.top_p, step=0.01, label="top_p")
                    top_k = gr.Slider(0, 100, value=start.top_k, step=1, label="top_k", info="1 = greedy, 0 = no limit")
                    max_new = gr.Slider(0, start.max_length, value=start.max_new_tokens or 0, step=1,
                                        label="max_new_tokens", info="0 = until max_length")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="Chat", elem_id="chat", render_markdown=False, height=420)
                query = gr.Textbox(placeholder=f"Ask about the {'video' if takes_video else 'image'}…",
                                   show_label=False, elem_id="query")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    clear = gr.Button("Clear", elem_id="clear")
        inputs = [media, query, convo, template_box, temperature, top_p, top_k, max_new]
        outputs = [chat, convo, boxes, query]
        # one shared queue: answers are generated one at a time, whichever way they were asked for
        send.click(respond, inputs, outputs, concurrency_id="answer")
        query.submit(respond, inputs, outputs, concurrency_id="answer")
        if examples:
            shown = gr.Examples([[str(e.file), e.prompt, e.template] for e in examples],
                                inputs=[media, query, template_box], example_labels=[e.label for e in examples])
            shown.load_input_event.then(respond, inputs, outputs, concurrency_id="answer")  # one click answers

        def forget(current: Conversation | None) -> tuple[list, None, None]:
            if current is not None:
                pool.close(current.id)
            return [], None, None

        for event in (clear.click, media.upload):
            event(forget, inputs=[convo], outputs=[chat, convo, boxes])
    return app


def cmd_web(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError("the web demo needs Gradio: pip install 'cogvlm[web]'") from None
    examples = load_examples(args.examples)
    sampling, options = sampling_flags(args), load_options(args)
    pool: SessionPool[ChatSession] = SessionPool(args.max_sessions, args.session_idle)  # fails before the load
    limits = UploadLimits(args.max_image_bytes, args.max_image_pixels, args.max_image_memory)
    listen_socket(args.host, args.port or 0).close()  # a bad --host or a --port in use: said before the load
    vlm, clips = load_model(options, sampling), video_limits(args)
    if vlm.config.video:
        pyav()  # its clips need PyAV: say so now, not at the first upload
    with uploads_folder():
        app = build_app(vlm, examples, args.template, pool, limits, clips)
        # quiet: Gradio's own banner tells users to "set share=True in launch()"; ours names the flag.
        # Uploads over --max-image-bytes (--max-video-bytes for a video model) stop before they reach the disk.
        _, local_url, share_url = app.queue().launch(server_name=args.host, server_port=args.port, share=args.share,
                                                     show_error=True, quiet=True, prevent_thread_lock=True,
                                                     max_file_size=clips.max_bytes if vlm.config.video
                                                     else limits.max_bytes)
        print(f"cogvlm web: running on {local_url}", flush=True)
        print(f"cogvlm web: public link {share_url}" if share_url else
              "cogvlm web: for a temporary public gradio.live link, restart with --share", flush=True)
        threading.Thread(target=_sweep, args=(pool,), daemon=True).start()
        app.block_thread()
    return 0


@contextmanager
def uploads_folder() -> Iterator[Path]:
    """A folder of this run for Gradio's uploads and drawn images (GRADIO_TEMP_DIR, inside the
    one the user set, if any), removed when the demo stops: on Ctrl-C and on SIGTERM, which is
    turned into the same KeyboardInterrupt so that this runs."""
    parent = os.environ.get("GRADIO_TEMP_DIR")
    if parent:
        os.makedirs(parent, exist_ok=True)  # Gradio makes it too, when it is first used
    folder = Path(tempfile.mkdtemp(prefix="cogvlm-web-", dir=parent))
    before = os.environ.get("GRADIO_TEMP_DIR"), signal.getsignal(signal.SIGTERM)
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield folder
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, before[1])
        if before[0] is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = before[0]
        shutil.rmtree(folder, ignore_errors=True)


def _sweep(pool: SessionPool[Any]) -> None:
    """Drop idle conversations even when no tab asks anything (their caches are the memory)."""
    while True:
        time.sleep(min(SWEEP_SECONDS, pool.idle))
        pool.expire()


def add_web_verb(verbs: Any) -> None:
    """Register `cogvlm web` on the top-level parser's subcommands."""
    p = verbs.add_parser("web", help="the Gradio web demo (pip install 'cogvlm[web]')",
                         description="Serve a chat page: upload or paste an image (a video, for CogVLM2-Video "
                                     "models), streamed answers, template and sampling controls, grounding boxes "
                                     "drawn on the image.")
    add_model_flags(p)
    p.add_argument("--english", action="store_true",
                   help="accepted, as by the authors' web_demo.py (the page is in English)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=port, help="port (default: Gradio's, 7860 or the next free one)")
    p.add_argument("--share", action="store_true", help="also open a temporary public gradio.live link")
    p.add_argument("--examples", type=Path, default=EXAMPLES, metavar="DIR",
                   help="folder with examples.json and its images and clips, shown as one-click examples: the "
                        "image ones for image models, the video ones for video models (default: the shipped ones)")
    p.add_argument("--session-idle", type=positive_float, default=DEFAULT_IDLE, metavar="SECONDS",
                   help=f"a conversation unused this long is closed, its cache freed, and uploads this old are "
                        f"deleted (default {DEFAULT_IDLE:g}); all uploads are deleted when the demo stops")
    p.add_argument("--max-image-bytes", type=positive_int, default=MAX_IMAGE_BYTES, metavar="N",
                   help=f"largest upload (default {MAX_IMAGE_BYTES}, as cogvlm serve)")
    p.add_argument("--max-image-pixels", type=positive_int, default=MAX_IMAGE_PIXELS, metavar="N",
                   help=f"largest width x height, read from the file's header (default {MAX_IMAGE_PIXELS}, as cogvlm "
                        f"serve); images past 50:1 are refused too")
    p.add_argument("--max-image-memory", type=positive_int, default=MAX_IMAGE_MEMORY, metavar="N",
                   help=f"what decoding and resizing an upload may take, in bytes (default {MAX_IMAGE_MEMORY})")
    p.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS, metavar="N",
                   help="conversations (browser tabs) that keep a KV cache, 1-1.8 GiB each on the published "
                        f"models (default {DEFAULT_MAX_SESSIONS}); a new one frees the least recently used, "
                        "whose tab is told and starts over")
    add_video_limit_flags(p)
    p.set_defaults(func=cmd_web)
