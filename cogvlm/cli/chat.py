"""`cogvlm chat`: the seed's command-line chat (interactive, answers streamed) plus a one-shot
mode for scripts (`--image X --query Q`, `--json`); `--video CLIP` for the video models.

Prompting and decoding stay in the API (`CogVLM.session`); this module is only the surface:
flags, the prompts in two languages, Ctrl-C handling and saving grounding drawings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, TextIO

from PIL import Image

from ..errors import ContextLengthError, ImageError, ImageRequiredError, TokenizerError, UsageError, VideoError
from ..files import atomic_path
from ..grounding import GroundedPhrase, draw_boxes, drawable, parse_boxes, parse_operations, turn_boxes
from ..image import load_image
from .flags import add_model_flags, load_model, load_options, sampling_flags, spellings

if TYPE_CHECKING:
    from ..api import ChatSession, CogVLM

# ---- grounding drawings -----------------------------------------------------------------------

# out of the working folder, kept across runs; each drawing's path is printed
DRAW_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cogvlm" / "boxes"

def save_drawing(image: Image.Image, phrases: list[GroundedPhrase], out_dir: Path, stem: str) -> Path:
    """Write a copy of `image` with the boxes drawn as a new PNG in `out_dir`, atomically, readable
    by others as any file the user makes (umask), not private as a temporary file is."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while (out_dir / f"{stem}-boxes-{n}.png").exists():
            n += 1
        target = out_dir / f"{stem}-boxes-{n}.png"
        with atomic_path(target) as tmp:
            draw_boxes(image, phrases).save(tmp, "PNG")
    except OSError as e:
        raise UsageError(f"cannot write the box drawing into {out_dir}: {e.strerror or e}") from None
    return target


def _stem(source: str) -> str:
    """A file-name stem for drawings of an image given as a path or URL."""
    return Path(urllib.parse.urlparse(source).path).stem or "image"


def _draw_turn(args: argparse.Namespace, image: Image.Image | None, source: str, query: str,
               answer: str) -> Path | None:
    phrases = turn_boxes(query, answer) if image is not None and not args.no_draw else []
    return save_drawing(drawable(image), phrases, args.draw_dir, _stem(source)) if phrases else None


# ---- the interactive chat ----------------------------------------------------------------------

@dataclass(frozen=True)
class Strings:
    """What the interactive chat prints, in one interface language."""

    welcome: str
    image: str
    video: str
    query: str
    answer: str
    drawn: str
    stopped: str
    need_image: str


STRINGS = {
    "en": Strings(
        welcome="Type 'clear' to start over with a new image, 'stop' to quit. Ctrl-C stops an answer.",
        image="Please enter the image path or URL (press Enter for plain text chat): ",
        video="Please enter the video path (press Enter for plain text chat): ",
        query="Human: ", answer="CogVLM: ", drawn="(boxes drawn: {})", stopped="[stopped]",
        need_image="--no_prompt writes captions: enter an image path or URL, or 'stop'."),
    "zh": Strings(
        welcome="输入 clear 换一张图像重新开始，输入 stop 退出。按 Ctrl-C 可中止当前回答。",
        image="请输入图像路径或URL（回车进入纯文本对话）：",
        video="请输入视频路径（回车进入纯文本对话）：",
        query="用户：", answer="CogVLM：", drawn="（已画出框：{}）", stopped="[已中止]",
        need_image="--no_prompt 用于图像描述：请输入图像路径或URL，或输入 stop 退出。"),
}


def print_stream(pieces: Iterable[str], out: TextIO) -> bool:
    """Print answer pieces as they come; False when Ctrl-C stopped the answer."""
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        return False
    return True


def _read(prompt: str) -> str | None:
    """One stripped input line; None at end of input (Ctrl-D)."""
    try:
        return input(prompt).strip()
    except EOFError:
        print()
        return None
    except UnicodeDecodeError:
        raise UsageError("standard input is not UTF-8 text") from None


def _turn(args: argparse.Namespace, text: Strings, session: ChatSession, query: str,
          image: Image.Image | None, source: str) -> None:
    print(text.answer, end="", flush=True)
    try:
        finished = print_stream(session.stream(query), sys.stdout)
    except (ContextLengthError, TokenizerError) as e:
        print(f"\n{e}")
        return
    print("" if finished else f" {text.stopped}")
    if finished:
        try:
            drawn = _draw_turn(args, image, source, query, session.history[-1][1])
        except UsageError as e:
            print(e)
            return
        if drawn:
            print(text.drawn.format(drawn))


def open_session(vlm: CogVLM, args: argparse.Namespace, source: str | None,
                 image: Image.Image | None = None) -> tuple[ChatSession, str]:
    """The session about `image`, or the video `source` for a video model (decoded once, here),
    and --no_prompt's caption query: an image's is empty in the base template, a video's the
    captioner's question in the chat template (as `CogVLM.caption`)."""
    from ..api import VIDEO_CAPTION_PROMPT

    video = source if vlm.config.video and source else None
    if args.no_prompt:
        return vlm.session(image, "chat" if video else "base", video=video), VIDEO_CAPTION_PROMPT if video else ""
    return vlm.session(image, args.template, video=video), args.query or ""


def interactive(vlm: CogVLM, args: argparse.Namespace) -> int:
    """The seed's loop: an image or a video (or none), then questions until `clear` (a new one)
    or `stop`."""
    try:
        import readline  # noqa: F401 -- gives input() line editing and history
    except ImportError:
        pass
    text = STRINGS[args.lang]
    print(text.welcome)
    first = args.image or args.video  # `--image X` without `--query`: the first conversation is about X
    while True:
        given = first is not None
        source, first = (first, None) if first else (_read(text.video if vlm.config.video else text.image), None)
        if source is None or source == "stop":
            return 0
        if args.no_prompt and not source:
            print(text.need_image)
            continue
        try:
            image = load_image(source) if source and not vlm.config.video else None
            session, query = open_session(vlm, args, source, image)
        except (ImageError, ImageRequiredError, VideoError) as e:  # CogAgent: no text-only chat
            if given:  # the flags' image or video: one line and exit 2
                raise
            print(e)
            continue
        if args.no_prompt:
            _turn(args, text, session, query, image, source)
            continue
        while True:
            query = _read(text.query)
            if query is None or query == "stop":
                return 0
            if query == "clear":
                break
            if query or session.template == "base":  # an empty query only means something to base
                _turn(args, text, session, query, image, source)


# ---- one-shot mode and the verb ----------------------------------------------------------------

def one_shot(vlm: CogVLM, args: argparse.Namespace, image: Image.Image | None) -> int:
    """Answer --query (or caption with --no_prompt), print it or a JSON record, and exit."""
    session, query = open_session(vlm, args, args.video, image)
    start = time.perf_counter()
    try:
        for piece in session.stream(query):
            if not args.json:
                print(piece, end="", flush=True)
    except ContextLengthError as e:
        raise UsageError(str(e)) from None
    seconds = time.perf_counter() - start
    answer = session.history[-1][1]
    drawn = _draw_turn(args, image, args.image or "", query, answer)
    if args.json:
        boxes = [{"phrase": p.phrase, "box": [b.x0, b.y0, b.x1, b.y1]}
                 for p in parse_boxes(answer).phrases for b in p.boxes]
        operations = [{"element": o.element, "label": o.label, "action": o.action, "argument": o.argument,
                       "boxes": [[b.x0, b.y0, b.x1, b.y1] for b in o.boxes]} for o in parse_operations(answer)]
        print(json.dumps({"answer": answer, "boxes": boxes, "operations": operations, "drawn": drawn and str(drawn),
                          "seconds": round(seconds, 3)}, ensure_ascii=False))
    else:
        print()
        if drawn:
            print(f"boxes drawn: {drawn}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    if args.query is not None and args.no_prompt:
        raise UsageError("--no_prompt captions with an empty query; drop --query")
    if args.image is not None and args.video is not None:
        raise UsageError("give --image or --video, not both: a conversation holds one of them")
    oneshot = args.query is not None or ((args.image or args.video) is not None and args.no_prompt)
    if args.json and not oneshot:
        raise UsageError("--json needs --query, or --image / --video with --no_prompt")
    if args.video is not None and not Path(args.video).is_file():  # before the slow load
        raise VideoError(f"video file not found: {args.video}")
    sampling, options = sampling_flags(args), load_options(args)
    image = load_image(args.image) if args.image else None  # a bad path fails before the slow load
    vlm = load_model(options, sampling)
    if args.video is not None:
        from ..prompt import check_takes_video

        check_takes_video(vlm.config)
    return one_shot(vlm, args, image) if oneshot else interactive(vlm, args)


def add_chat_verb(verbs: Any) -> None:
    """Register `cogvlm chat` on the top-level parser's subcommands."""
    p = verbs.add_parser("chat", help="chat about images in the terminal (or answer one question)",
                         description="Interactive chat with streamed answers; with --query it answers once "
                                     "and exits. Boxes in a turn are drawn on a copy of the image.")
    add_model_flags(p)
    lang = p.add_mutually_exclusive_group()
    lang.add_argument("--english", dest="lang", action="store_const", const="en", help="English prompts (default)")
    lang.add_argument("--chinese", dest="lang", action="store_const", const="zh", help="Chinese prompts")
    p.set_defaults(lang="en")
    p.add_argument(*spellings("no_prompt"), action="store_true",
                   help="captioning: the base template with an empty query, one caption per image")
    p.add_argument("--image", metavar="PATH_OR_URL",
                   help="the image to ask about: with --query one answer and exit, else chat about it")
    p.add_argument("--video", metavar="PATH",
                   help="the clip to ask about (CogVLM2-Video models): sampled as the template's demo does "
                        "(chat: a frame a second, up to 24; base: 24 over the first 60 s); with --no_prompt "
                        "the captioner's question 'Please describe this video in detail.'")
    p.add_argument("--query", help="one-shot mode: the question; prints the answer and exits")
    p.add_argument("--json", action="store_true",
                   help='one-shot mode: print {"answer", "boxes", "operations", "drawn", "seconds"} '
                        '(operations: CogAgent\'s "Grounded Operation:" lines)')
    p.add_argument("--draw-dir", "--draw_dir", type=Path, default=DRAW_DIR, metavar="DIR",
                   help=f"where images with the turn's boxes drawn are saved (default: {DRAW_DIR})")
    p.add_argument("--no-draw", "--no_draw", action="store_true", help="do not save box drawings")
    p.set_defaults(func=cmd_chat)
