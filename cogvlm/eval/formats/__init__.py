"""Readers for the benchmarks' files exactly as their publishers distribute them.

Each reader turns its files into `Item`s (one question, expression or image to answer) and says
which split they are. Items whose answers the publisher keeps hidden have `answers=None`: the
runner writes the official server's submission file for them instead of a score.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ...errors import UsageError


@dataclass
class Item:
    id: str  # unique within the benchmark; keys the predictions journal
    image: Path | bytes  # a file, or encoded image bytes (VLMEvalKit TSV)
    fields: dict[str, str]  # what the prompt may use: {question}, {expression}, {options}, ...
    answers: list[str] | None  # None: hidden test answers; [] when the answer is a box in meta
    meta: dict[str, Any] = field(default_factory=dict)  # what the metric or submission needs

    @property
    def key(self) -> str:
        """The item's id as its publisher's files name it (what `--predictions` rows give)."""
        return str(self.meta.get("key", self.id))


@dataclass
class Benchmark:
    split: str
    items: list[Item]
    notes: list[str] = field(default_factory=list)  # what the report must say about the reading


def load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}); is the download complete?") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not valid JSON (not UTF-8 text); is it the right file?") from None


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UsageError(f"{path} line {n} is not JSON") from None
    return rows


def one_file(paths: Sequence[Path], what: str) -> Path:
    if len(paths) != 1:
        raise UsageError(f"--annotations takes one file here ({what}), got {len(paths)}")
    return paths[0]


def require(obj: Any, keys: Iterable[str], path: Path, what: str) -> None:
    missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise UsageError(f"{path} has no {', '.join(missing)}: is it {what}?")


def find_image(images: Path | None, *names: str) -> Path:
    """The first of `images/name` that exists (publishers nest their folders differently); the
    first candidate when none does, so the missing-file message names the expected path."""
    root = images or Path(".")
    for name in names:
        if (root / name).is_file():
            return root / name
    return root / names[0]


def check_images(items: Sequence[Item]) -> None:
    """Fail before any model work when images are missing: usually a wrong --images folder."""
    missing = [it.image for it in items if isinstance(it.image, Path) and not it.image.is_file()]
    if missing:
        raise UsageError(f"{len(missing)} of {len(items)} images not found, e.g. {missing[0]}; check --images")


@contextmanager
def rows_of(path: Path, row: str) -> Iterator[None]:
    """Turn what a reader's indexing of a publisher's file raises on a crafted or damaged row (a
    missing key, a wrong type, a short list, a number out of range) into one UsageError naming
    the file and the row."""
    try:
        yield
    except KeyError as e:
        raise UsageError(f"{path}, {row}: no {e} field; is the download complete and the right file?") from None
    except (TypeError, AttributeError, IndexError, ValueError, OverflowError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(f"{path}, {row}: unexpected content ({type(e).__name__}: {str(e)[:200]})") from None
