"""The JSONL conversation format used for training and evaluation (docs/data-format.md).

Bad records are reported with their line number and skipped, never silently dropped and never
fatal: one broken line must not cost a whole training run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

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
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[Record] = []
    errors: list[RecordError] = []
    image_errors: dict[Path, str | None] = {}  # many records share one image
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                if not text.strip():
                    continue
                record = _parse(text, number, path.parent, max_answer_chars)
                if check_images and record.image is not None:
                    if record.image not in image_errors:
                        image_errors[record.image] = _image_problem(record.image)
                    if image_errors[record.image]:
                        raise ValueError(image_errors[record.image])
                records.append(record)
            except UnicodeDecodeError as e:
                errors.append(RecordError(number, f"invalid UTF-8 at byte {e.start}"))
            except ValueError as e:
                errors.append(RecordError(number, str(e)))
    return records, errors


def _parse(text: str, line: int, root: Path, max_answer_chars: int | None) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"invalid record: expected a JSON object, got {type(obj).__name__}")
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
