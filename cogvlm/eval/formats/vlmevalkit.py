"""VLMEvalKit's benchmark TSV files (one row per question, the image base64-encoded in the row),
so a VLMEvalKit download can be reused: TextVQA_VAL, OK-VQA, VizWiz, GQA_TestDev_Balanced,
ScienceQA_{VAL,TEST}, POPE, COCO_VAL."""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import sys
from pathlib import Path
from typing import Sequence

from ...errors import UsageError
from . import Benchmark, Item, one_file, rows_of

LETTERS = "ABCDE"


def _answers(text: str) -> list[str]:
    """VLMEvalKit stores several answers as a Python list literal: "['two', '2', ...]"."""
    if text.startswith("["):
        try:
            value = ast.literal_eval(text)  # literals only: never runs code
            return [str(v) for v in value]
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # not a flat literal list
            pass
    return [text]


def read_tsv(paths: Sequence[Path], kind: str, split: str | None) -> Benchmark:
    """`kind` says how the task reads a row: 'vqa' (question, answer list), 'choice' (question,
    hint, A-E, answer letter), 'yesno' (question, answer yes/no), 'caption' (answer list)."""
    path = one_file(paths, "a VLMEvalKit .tsv")
    rows = _read_rows(path)
    if rows and not {"index", "image"} <= set(rows[0]):
        raise UsageError(f"{path} has no index and image columns: not a VLMEvalKit TSV")
    by_index = {r["index"]: r["image"] for r in rows}
    items = []
    for n, r in enumerate(rows, 1):
        with rows_of(path, f"row {n}"):
            items.append(_item(r, by_index, kind, path))
    suffix = path.stem.rsplit("_", 1)[-1].lower()  # TextVQA_VAL, ScienceQA_TEST: the publisher's split
    return Benchmark(split or (suffix if suffix in ("val", "test") else path.stem), items)


def _read_rows(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}): not a VLMEvalKit TSV") from None
    except csv.Error as e:
        raise UsageError(f"{path} is not a readable TSV: {e}") from None


def _item(r: dict[str, str], by_index: dict[str, str], kind: str, path: Path) -> Item:
    """One row's item. A row shorter than the header has None in its last columns (rows_of
    names the line when that breaks something)."""
    image = r["image"]
    if len(image) <= 64 and image.isdigit():  # a repeated image points at its first row
        image = by_index[image]
    try:
        data = base64.b64decode(image, validate=True)
    except binascii.Error:
        raise UsageError(f"{path}: row {r['index']} has no base64 image") from None
    answer = r.get("answer")
    fields = {"question": r.get("question") or ""}
    if kind == "choice":
        choices = [r[c] for c in LETTERS if r.get(c) not in (None, "", "nan")]
        fields["options"] = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        hint = r.get("hint") or ""
        fields["context"] = f"Context: {hint}\n" if hint and hint != "nan" else ""
        answers = [answer] if answer else None
    else:
        answers = _answers(answer) if answer not in (None, "") else None
    return Item(r["index"], data, fields, answers, {"category": r.get("category")})
