"""The JSONL conversation format used for training and evaluation (docs/data-format.md).

Bad records are reported with their line number and skipped, never silently dropped and never
fatal: one broken line must not cost a whole training run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from PIL import Image

from ..config import TEMPLATES

REQUIRED_KEYS = ("image", "template", "turns")


@dataclass
class Record:
    image: Path | None  # resolved against the JSONL file's folder; None for text-only
    template: str
    turns: list[tuple[str, str]]  # (query, answer)
    line: int  # 1-based line in the JSONL file, for messages


@dataclass
class RecordError:
    line: int
    message: str


def read_records(path: str | Path, check_images: bool = True,
                 max_answer_chars: int | None = None) -> tuple[list[Record], list[RecordError]]:
    """Parse every non-blank line; return the good records and one error per bad line.

    `check_images` opens every image with PIL (each file once), so that a broken file is found
    here rather than mid-training. `max_answer_chars` is a cheap stand-in for a token limit.
    """
    path = Path(path)
    image_errors: dict[Path, str | None] = {}  # many records share one image

    def parse(text: str, number: int) -> Record:
        record = _parse(text, number, path.parent, max_answer_chars)
        if check_images and record.image is not None:
            if record.image not in image_errors:
                image_errors[record.image] = _image_problem(record.image)
            if image_errors[record.image]:
                raise ValueError(image_errors[record.image])
        return record
    return _read_lines(path, parse)


T = TypeVar("T")


def _read_lines(path: Path, parse: Callable[[str, int], T]) -> tuple[list[T], list[RecordError]]:
    """`parse(text, line number)` on every non-blank line (a BOM on the first is dropped); a line
    that is not UTF-8 or that `parse` refuses (ValueError) becomes a RecordError."""
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[T] = []
    errors: list[RecordError] = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if text.strip():
                    records.append(parse(text, number))
            except UnicodeDecodeError as e:
                errors.append(RecordError(number, f"invalid UTF-8 at byte {e.start}"))
            except ValueError as e:
                errors.append(RecordError(number, str(e)))
    return records, errors


def _json_object(text: str) -> dict[str, Any]:
    """One line's JSON object, or a ValueError saying why not."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"invalid record: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse(text: str, line: int, root: Path, max_answer_chars: int | None) -> Record:
    obj = _json_object(text)
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)} (use \"image\": null for text-only)"
                         if missing == ["image"] else f"missing key(s): {', '.join(missing)}")
    template = obj["template"]
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'turns' must be a non-empty list of {\"query\", \"answer\"} objects")
    pairs = []
    for i, turn in enumerate(turns, 1):
        if not (isinstance(turn, dict) and isinstance(turn.get("query"), str)
                and isinstance(turn.get("answer"), str)):
            raise ValueError(f"turn {i} needs string 'query' and 'answer'")
        if max_answer_chars is not None and len(turn["answer"]) > max_answer_chars:
            raise ValueError(f"turn {i}: answer of {len(turn['answer'])} characters is over "
                             f"the limit of {max_answer_chars}")
        pairs.append((turn["query"], turn["answer"]))
    image = obj["image"]
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ValueError("'image' must be a non-empty path string or null")
    return Record(None if image is None else root / image, template, pairs, line)


def _image_problem(path: Path) -> str | None:
    """Why `path` cannot be used as an image, or None if PIL reads it."""
    if not path.is_file():
        return f"image not found: {path}"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for bad files
        return f"unreadable image {path}: {type(e).__name__}: {e}"
    return None


# ---- video sets (docs/data-format.md "Video records"): one question about one clip per line ----

VIDEO_KEYS = ("id", "video", "question")


@dataclass
class VideoRecord:
    id: str  # unique in the file: keys an evaluation's predictions journal
    video: Path  # resolved against the JSONL file's folder, as an image is; decoded when used
    question: str
    answers: list[str]  # "answer" (one) or "answers" (several annotators'); training takes the first
    line: int


def is_video_set(path: str | Path) -> bool:
    """Whether the JSONL file holds video records: its first JSON object has a "video" key."""
    with Path(path).open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    return False
                return isinstance(obj, dict) and "video" in obj
    return False


def read_video_records(path: str | Path, max_answer_chars: int | None = None) -> tuple[list[VideoRecord], list[RecordError]]:
    """Parse every non-blank line of a video set; the good records and one error per bad line.
    Clips are not opened here: a clip that does not decode is found where it is used (an
    evaluation records it as an error row; fine-tuning skips it when it counts the frames)."""
    path = Path(path)
    seen: dict[str, int] = {}

    def parse(text: str, number: int) -> VideoRecord:
        record = _parse_video(text, number, path.parent, max_answer_chars)
        if record.id in seen:
            raise ValueError(f"id {record.id!r} is already used on line {seen[record.id]}")
        seen[record.id] = number
        return record
    return _read_lines(path, parse)


def _parse_video(text: str, line: int, root: Path, max_answer_chars: int | None) -> VideoRecord:
    obj = _json_object(text)
    missing = [k for k in VIDEO_KEYS if k not in obj] + ([] if "answer" in obj or "answers" in obj else ["answer"])
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)} (a video record is "
                         f'{{"id", "video", "question", "answer" or "answers"}})')
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool) or not str(obj["id"]).strip():
        raise ValueError("'id' must be a non-empty string or an integer")
    if not isinstance(obj["video"], str) or not obj["video"].strip():
        raise ValueError("'video' must be a non-empty path string")
    if not isinstance(obj["question"], str):
        raise ValueError("'question' must be a string")
    answers = [obj["answer"]] if "answer" in obj else obj["answers"]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError("'answer' must be a string ('answers': a non-empty list of strings)")
    if max_answer_chars is not None and len(answers[0]) > max_answer_chars:
        raise ValueError(f"answer of {len(answers[0])} characters is over the limit of {max_answer_chars}")
    return VideoRecord(str(obj["id"]), root / obj["video"], obj["question"], answers, line)
