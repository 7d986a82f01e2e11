"""Closed-answer files: ScienceQA (problems.json, image subset) and POPE (JSONL, yes/no)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...errors import UsageError
from . import Benchmark, Item, find_image, load_json, one_file, read_jsonl

LETTERS = "ABCDE"


def read_scienceqa(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """ScienceQA's data/scienceqa/problems.json ({pid: {question, choices, answer, hint, image,
    split}}); only problems with an image, images at {split}/{pid}/image.png."""
    path = one_file(paths, "ScienceQA problems.json")
    data = load_json(path)
    if not isinstance(data, dict) or (data and "choices" not in next(iter(data.values()))):
        raise UsageError(f"{path} is not ScienceQA's problems.json")
    split = split or "test"
    items = []
    for pid, p in data.items():
        if p.get("split") != split or not p.get("image"):
            continue
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(p["choices"]))
        context = f"Context: {p['hint']}\n" if p.get("hint") else ""
        items.append(Item(pid, find_image(images, f"{split}/{pid}/{p['image']}", f"{pid}/{p['image']}"),
                          {"question": p["question"], "options": options, "context": context},
                          [LETTERS[p["answer"]]], {"choices": p["choices"]}))
    return Benchmark(split, items)


def read_pope(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """POPE's output/coco/coco_pope_{random,popular,adversarial}.json: JSON lines of
    {question_id, image, text, label}."""
    path = one_file(paths, "coco_pope_<setting>.json")
    rows = read_jsonl(path)
    if rows and not {"question_id", "image", "text", "label"} <= set(rows[0]):
        raise UsageError(f"{path} is not a POPE file (JSON lines of question_id, image, text, label)")
    kind = split or path.stem.rsplit("_", 1)[-1]
    items = [Item(str(r["question_id"]), find_image(images, r["image"], f"val2014/{r['image']}"),
                  {"question": r["text"]}, [r["label"]]) for r in rows]
    return Benchmark(kind, items)
