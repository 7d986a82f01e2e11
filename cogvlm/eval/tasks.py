"""The benchmarks: how each is read, asked, scored and submitted, and the numbers published for it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..grounding import parse_boxes
from . import metrics as M
from .formats import Benchmark, Item
from .formats.captions import read_coco_captions, read_karpathy
from .formats.choice import LETTERS, read_pope, read_scienceqa
from .formats.grounding import read_refcoco, read_visual7w
from .formats.vqa import read_gqa, read_textvqa, read_vizwiz, read_vqa

Reader = Callable[[Sequence[Path], "Path | None", "str | None"], Benchmark]
Predictions = dict[str, str]
PAPER = "CogVLM paper (arXiv:2311.03079), CogVLM-17B"


@dataclass(frozen=True)
class Published:
    split: str
    metric: str
    value: float  # in the report's scale: percent, CIDEr x 100
    model: str
    source: str


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    reader: Reader
    score: Callable[[Sequence[Item], Predictions], dict[str, float]]
    prompt: str  # key of prompts.PROMPTS
    max_new_tokens: int
    tsv_kind: str | None = None  # how a VLMEvalKit TSV row reads, if VLMEvalKit ships this benchmark
    submission: Callable[[Sequence[Item], Predictions], list[dict[str, Any]]] | None = None
    published: tuple[Published, ...] = field(default_factory=tuple)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def score_vqa(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    out = {"accuracy": _mean([M.vqa_accuracy(preds[it.id], it.answers) for it in items])}
    kinds = sorted({it.meta.get("answer_type") for it in items} - {None})
    for kind in kinds:  # the official report's per-answer-type rows
        out[f"accuracy/{kind}"] = _mean([M.vqa_accuracy(preds[it.id], it.answers) for it in items
                                         if it.meta.get("answer_type") == kind])
    return out


def score_evalai_vqa(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    return {"accuracy": _mean([M.evalai_vqa_accuracy(preds[it.id], it.answers) for it in items])}


def score_exact(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    return {"accuracy": _mean([M.exact_match(preds[it.id], it.answers[0]) for it in items])}


def chosen_letter(text: str, n_choices: int) -> str | None:
    """The option a free-form answer picks: a lone letter A-E ("B", "(B)", "B. cat"), else None."""
    m = re.search(rf"\b([{LETTERS[:n_choices]}])\b", text.strip())
    return m.group(1) if m else None


def score_choice(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    return {"accuracy": _mean([float(chosen_letter(preds[it.id], len(it.meta.get("choices") or LETTERS))
                                     == it.answers[0]) for it in items])}


def score_captions(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    scores = M.caption_scores({it.id: preds[it.id] for it in items}, {it.id: it.answers for it in items})
    out = {"cider": scores["cider"], "bleu4": scores["bleu4"]}
    domains = sorted({it.meta.get("domain") for it in items} - {None})
    for d in domains:  # NoCaps reports in-, near- and out-domain CIDEr beside the overall one
        part = [it for it in items if it.meta.get("domain") == d]
        out[f"cider/{d}"] = M.caption_scores({it.id: preds[it.id] for it in part},
                                             {it.id: it.answers for it in part})["cider"]
    return out


def _first_box(text: str, size: tuple[int, int]) -> M.PixelBox | None:
    boxes = parse_boxes(text).boxes
    return M.box_to_pixels(boxes[0], *size) if boxes else None


def score_rec(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    hits = []
    for it in items:
        box = _first_box(preds[it.id], it.meta["size"])
        hits.append(float(box is not None and M.pixel_iou(box, it.meta["box"]) >= 0.5))
    return {"acc@0.5": _mean(hits)}


def score_pointing(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    """Right when the predicted box overlaps the right candidate most (IoU), as a pick among four."""
    hits = []
    for it in items:
        box = _first_box(preds[it.id], it.meta["size"])
        if box is None:
            hits.append(0.0)
            continue
        ious = [M.pixel_iou(box, c) for c in it.meta["candidates"]]
        hits.append(float(max(ious) > 0 and ious.index(max(ious)) == it.meta["answer"]))
    return {"accuracy": _mean(hits)}


def score_pope(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    """One file per setting from POPE's repository; VLMEvalKit's POPE mixes the three settings in
    one file with a category column, so each category also gets its accuracy and F1."""
    out = M.pope_metrics((M.pope_answer(preds[it.id]), it.answers[0]) for it in items)
    for cat in sorted({it.meta.get("category") for it in items} - {None}):
        part = M.pope_metrics((M.pope_answer(preds[it.id]), it.answers[0]) for it in items
                              if it.meta.get("category") == cat)
        out.update({f"accuracy/{cat}": part["accuracy"], f"f1/{cat}": part["f1"]})
    return out


def score_tdiuc(items: Sequence[Item], preds: Predictions) -> dict[str, float]:
    return M.mean_per_type((it.meta.get("question_type") or "all", M.exact_match(preds[it.id], it.answers[0]))
                           for it in items)


def _by_question_id(items: Sequence[Item], preds: Predictions) -> list[dict[str, Any]]:
    return [{"question_id": it.meta["question_id"], "answer": preds[it.id]} for it in items]


def _vizwiz_submission(items: Sequence[Item], preds: Predictions) -> list[dict[str, Any]]:
    return [{"image": it.id, "answer": preds[it.id]} for it in items]


def _gqa_submission(items: Sequence[Item], preds: Predictions) -> list[dict[str, Any]]:
    return [{"questionId": it.id, "prediction": preds[it.id]} for it in items]


def _caption_submission(items: Sequence[Item], preds: Predictions) -> list[dict[str, Any]]:
    return [{"image_id": it.meta["image_id"], "caption": preds[it.id]} for it in items]


GROUNDING = "cogvlm-grounding-generalist"
GROUNDING_SOURCE = "cogvlm.md §8 (cogvlm-grounding-generalist-v1.1, the authors' README)"


def _rec(name: str, title: str, numbers: dict[str, float]) -> Task:
    return Task(name, title, read_refcoco, score_rec, "rec", 48,
                published=tuple(Published(s, "acc@0.5", v, GROUNDING, GROUNDING_SOURCE) for s, v in numbers.items()))


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("vqav2", "VQAv2", read_vqa, score_vqa, "short_answer", 16, "vqa", _by_question_id,
         (Published("test-dev2015", "accuracy", 82.3, PAPER, "paper Table 2"),)),
    Task("okvqa", "OK-VQA", read_vqa, score_vqa, "short_answer", 16, "vqa", _by_question_id,
         (Published("val2014", "accuracy", 64.8, PAPER, "paper Table 2"),)),
    Task("textvqa", "TextVQA", read_textvqa, score_evalai_vqa, "short_answer", 16, "vqa", _by_question_id, (
        Published("val", "accuracy", 70.4, PAPER, "paper Table 2"),
        Published("val", "accuracy", 69.7, "cogvlm-chat-v1.1", "cogvlm2.md §11 (CogVLM1.1)"),
        Published("val", "accuracy", 84.2, "cogvlm2-llama3-chat-19B", "cogvlm2.md §11"),
        Published("val", "accuracy", 85.0, "cogvlm2-llama3-chinese-chat-19B", "cogvlm2.md §11"))),
    Task("vizwiz", "VizWiz-VQA", read_vizwiz, score_evalai_vqa, "short_answer", 16, "vqa", _vizwiz_submission),
    Task("gqa", "GQA", read_gqa, score_exact, "short_answer", 16, "vqa", _gqa_submission),
    Task("scienceqa", "ScienceQA (image subset)", read_scienceqa, score_choice, "choice", 8, "choice", None,
         (Published("test", "accuracy", 91.2, PAPER, "paper, as listed by leaderboards (subset not stated there)"),)),
    Task("coco", "COCO captions (Karpathy test)", read_karpathy, score_captions, "caption", 64, "caption",
         _caption_submission, (Published("test", "cider", 148.7, PAPER, "paper Table 1"),)),
    Task("nocaps", "NoCaps", read_coco_captions, score_captions, "caption", 64, None, _caption_submission,
         (Published("val", "cider", 128.3, PAPER, "paper Table 1 (overall)"),)),
    Task("flickr30k", "Flickr30k (Karpathy test)", read_karpathy, score_captions, "caption", 64, None,
         _caption_submission, (Published("test", "cider", 94.9, PAPER, "paper Table 1"),)),
    _rec("refcoco", "RefCOCO", {"val": 92.76, "testA": 94.75, "testB": 88.99}),
    _rec("refcoco+", "RefCOCO+", {"val": 88.68, "testA": 92.91, "testB": 83.39}),
    _rec("refcocog", "RefCOCOg", {"val": 89.75, "test": 90.79}),
    Task("visual7w", "Visual7W (pointing)", read_visual7w, score_pointing, "pointing", 48,
         published=(Published("test", "accuracy", 91.05, GROUNDING, GROUNDING_SOURCE),)),
    Task("pope", "POPE", read_pope, score_pope, "yes_no", 8, "yesno",
         published=(Published("adversarial", "accuracy", 87.6, PAPER, "cogvlm.md §8"),)),
    Task("tdiuc", "TDIUC", read_vqa, score_tdiuc, "short_answer", 16),
)}
