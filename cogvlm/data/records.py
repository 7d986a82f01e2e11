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


@dataclass
class Record:
    image: Path | None
    template: str
    turns: list[tuple[str, str]]
    line: int


@dataclass
class RecordError:
    line: int
    message: str


def read_records(path: str | Path, check_images: bool = True,
                 max_answer_chars: int | None = None) -> tuple[list[Record], list[RecordError]]:
    """Parse every line; return the good records and one error per bad line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records, errors = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                records.append(_parse(text, number, path.parent, check_images, max_answer_chars))
            except ValueError as e:
                errors.append(RecordError(number, str(e)))
    return records, errors


def _parse(text: str, line: int, root: Path, check_images: bool, max_answer_chars: int | None) -> Record:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise ValueError("a record must be a JSON object")
    missing = [k for k in ("template", "turns") if k not in obj]
    if missing:
        raise ValueError(f"missing key(s): {', '.join(missing)}")
    template = obj["template"]
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; expected one of {', '.join(TEMPLATES)}")
    turns = obj["turns"]
    if not isinstance(turns, list) or not turns:
        raise ValueError("'turns' must be a non-empty list of {query, answer} objects")
    pairs = []
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict) or not isinstance(turn.get("query"), str) or not isinstance(turn.get("answer"), str):
            raise ValueError(f"turn {i} needs string 'query' and 'answer'")
        if max_answer_chars is not None and len(turn["answer"]) > max_answer_chars:
            raise ValueError(f"turn {i}: answer of {len(turn['answer'])} characters is over the limit of {max_answer_chars}")
        pairs.append((turn["query"], turn["answer"]))
    image = obj.get("image")
    if image is not None:
        if not isinstance(image, str):
            raise ValueError("'image' must be a path string or null")
        image = (root / image) if not Path(image).is_absolute() else Path(image)
        if check_images:
            _check_image(image)
    return Record(image, template, pairs, line)


def _check_image(path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for bad files
        raise ValueError(f"unreadable image {path}: {type(e).__name__}: {e}") from None
