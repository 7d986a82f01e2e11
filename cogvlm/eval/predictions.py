"""Answers that already exist (`cogvlm eval --task T --predictions FILE`): any model's answers,
matched to the benchmark's items by the id the publisher's files use, and checked, so that a
wrong id, a missing answer or a duplicate is counted and reported instead of silently scored.

One JSON object per line (or one JSON list, as the servers' result files are):
{"question_id": ..., "answer": ...}; captions {"image_id": ..., "caption": ...}. The id field may
also be spelled as the task's submission file spells it ("image" for VizWiz, "questionId" for
GQA), and the answer as "prediction" (GQA) or "text" (LLaVA's answer files).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from .formats import Item

ID_KEYS = ("question_id", "questionId", "image_id", "image")
ANSWER_KEYS = ("answer", "caption", "prediction", "text")
EXAMPLES = 5  # ids quoted per kind of problem in the report


@dataclass
class PredictionCheck:
    """What did not match the benchmark: ids unknown to it, items without an answer (scored as an
    empty answer, so wrong), ids answered more than once (the first answer is scored)."""

    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    duplicate: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {kind: {"count": len(ids), "examples": ids[:EXAMPLES]}
                for kind, ids in (("unknown", self.unknown), ("missing", self.missing), ("duplicate", self.duplicate))}

    def lines(self) -> list[str]:
        """One report line per kind of problem found."""
        said = {"unknown": "ids not in the benchmark, ignored",
                "missing": "items without an answer, scored as an empty answer",
                "duplicate": "ids answered more than once, the first answer scored"}
        return [f"{s['count']} {said[kind]}: {', '.join(s['examples'])}{' ...' if s['count'] > EXAMPLES else ''}"
                for kind, s in self.summary().items() if s["count"]]


def _rows(path: Path) -> list[tuple[int, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text: is it the predictions file?") from None
    if text.lstrip().startswith("["):
        try:
            return list(enumerate(json.loads(text), 1))
        except json.JSONDecodeError as e:
            raise UsageError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError:
                raise UsageError(f"{path} line {n} is not JSON") from None
    return rows


def _field(row: Any, keys: Sequence[str], path: Path, n: int, what: str) -> Any:
    if isinstance(row, dict):
        for k in keys:
            if k in row:
                return row[k]
    raise UsageError(f"{path} record {n} has no {what} ({' / '.join(keys)})")


def read_predictions_file(path: Path, items: Sequence[Item]) -> tuple[dict[str, str], PredictionCheck]:
    """The answers of `path` keyed by item id, and what did not match `items`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"predictions file not found: {path}")
    by_key = {it.key: it.id for it in items}
    preds: dict[str, str] = {}
    check = PredictionCheck()
    for n, row in _rows(Path(path)):
        key = str(_field(row, ID_KEYS, path, n, "id"))
        answer = _field(row, ANSWER_KEYS, path, n, "answer")
        if key not in by_key:
            check.unknown.append(key)
        elif by_key[key] in preds:
            check.duplicate.append(key)
        else:
            preds[by_key[key]] = "" if answer is None else str(answer)
    check.missing = [it.key for it in items if it.id not in preds]
    return preds, check
