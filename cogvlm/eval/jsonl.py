"""Evaluation on a JSONL set in the training format (`cogvlm eval DATA.jsonl`; the published
benchmarks are in the rest of `cogvlm.eval`): VQA accuracy, referring-expression Acc@0.5, caption
object-set match (docs/spec/cogvlm.md section 8 metric definitions).

Each turn is scored by the task its prompt shows: the vqa template → VQA accuracy; a box-only
reference answer → REC (IoU ≥ 0.5); an empty base query → caption object set; a grounded-caption
prompt → object set and boxes; anything else → normalized exact match.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..data.records import read_records
from ..files import write_text
from ..grounding import iou, parse_boxes
from .metrics import normalize_answer, vqa_2016_accuracy


def vqa_accuracy(prediction: str, annotator_answers: Sequence[str]) -> float:
    """The official VQAv2 rule for several annotators; with a single reference answer (our
    synthetic sets) normalized exact match, since leave-one-out needs more than one."""
    if len(annotator_answers) == 1:
        return float(normalize_answer(prediction) == normalize_answer(annotator_answers[0]))
    return vqa_2016_accuracy(prediction, annotator_answers)


def object_set(caption: str) -> frozenset[str]:
    """'a large red circle and a small blue square.' → {'large red circle', 'small blue square'}."""
    text = parse_boxes(caption).clean_text.lower().strip().rstrip(".")
    parts = re.split(r",\s*(?:and\s+)?|\s+and\s+", text)
    return frozenset(normalize_answer(p) for p in parts if p.strip())


def task_of(template: str, query: str, reference: str) -> str:
    ref_boxes = parse_boxes(reference)
    if template == "vqa":
        return "vqa"
    if template == "base" and not query.strip():
        return "caption"
    if ref_boxes.boxes and not ref_boxes.clean_text.strip(" ."):
        return "rec"
    if ref_boxes.boxes:
        return "grounded_caption"
    return "exact"


def score(task: str, prediction: str, reference: str) -> dict[str, float]:
    if task == "vqa":
        return {"vqa_accuracy": vqa_accuracy(prediction, [reference])}
    if task == "rec":
        predicted = parse_boxes(prediction).boxes
        hit = bool(predicted) and iou(predicted[0], parse_boxes(reference).boxes[0]) >= 0.5
        return {"rec_acc@0.5": float(hit)}
    if task == "caption":
        return {"caption_object_match": float(object_set(prediction) == object_set(reference))}
    if task == "grounded_caption":
        ref, pred = parse_boxes(reference), parse_boxes(prediction)
        hits = [any(iou(p, b) >= 0.5 for p in pred.boxes) for b in ref.boxes]
        return {"grounded_object_match": float(object_set(prediction) == object_set(reference)),
                "grounded_box_recall@0.5": sum(hits) / len(hits)}
    return {"exact_match": float(normalize_answer(prediction) == normalize_answer(reference))}


def evaluate(vlm, path: str | Path, batch_size: int = 16, limit: int | None = None,
             progress: bool = True) -> dict:
    """Greedy answers for every turn (earlier turns as history) and the mean of each metric."""
    from tqdm.auto import tqdm

    records, errors = read_records(Path(path))
    items = []
    for rec in records[:limit]:
        for i, (query, answer) in enumerate(rec.turns):
            items.append((rec, i, query, answer))
    by_template: dict[str, list] = defaultdict(list)
    for item in items:  # one template per generate() call
        by_template[item[0].template].append(item)
    sums: dict[str, list[float]] = defaultdict(list)
    examples = []
    bar = tqdm(total=len(items), desc="eval", unit="answer", disable=not progress)
    for template, group in by_template.items():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            requests = [(rec.image, q, rec.turns[:i]) for rec, i, q, _ in batch]
            answers = vlm.generate(requests, template=template, top_k=1)
            for (rec, i, q, ref), pred in zip(batch, answers):
                task = task_of(template, q, ref)
                for name, value in score(task, pred, ref).items():
                    sums[name].append(value)
                examples.append({"line": rec.line, "task": task, "query": q, "reference": ref, "prediction": pred})
            bar.update(len(batch))
    bar.close()
    metrics = {name: sum(v) / len(v) for name, v in sorted(sums.items())}
    counts = {name: len(v) for name, v in sorted(sums.items())}
    return {"metrics": metrics, "counts": counts, "skipped_records": len(errors), "examples": examples}


def format_table(result: dict) -> str:
    rows = [f"{'metric':<28} {'score':>7} {'n':>6}"]
    for name, value in result["metrics"].items():
        rows.append(f"{name:<28} {value:>7.3f} {result['counts'][name]:>6}")
    return "\n".join(rows)


def write_json(result: dict, path: str | Path) -> None:
    write_text(Path(path), json.dumps(result, indent=2))
