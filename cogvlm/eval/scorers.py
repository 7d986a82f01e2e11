"""The scorers: each benchmark's official scoring code (followed rule by rule in `metrics`) applied
to a run's items, one name per scorer, selectable with `--scorer NAME`.

A task lists the scorers that apply to it; its first is the default and is the one its publisher
or evaluation server runs (docs/eval.md names each with its repository and commit). `lenient` is
today's relaxed matching, kept for comparison: never a default, always labelled in the report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import UsageError
from ..grounding import parse_boxes
from . import metrics as M
from .formats import Item
from .formats.choice import LETTERS

Predictions = dict[str, str]
# scores items with their predictions; appends to `notes` what the report must say about the scoring
ScoreFn = Callable[[Sequence[Item], Predictions, list[str]], dict[str, float]]


@dataclass(frozen=True)
class Scorer:
    name: str
    score: ScoreFn
    source: str  # the code followed: repository, commit, file
    official: bool = True


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _rows_by(items: Sequence[Item], kind_of: Callable[[Item], str | None], value: dict[str, float],
             prefix: str) -> dict[str, float]:
    """One row per kind of item (answer type, GQA's open/binary), as the official reports break down."""
    out = {}
    for kind in sorted({kind_of(it) for it in items} - {None}):
        out[f"{prefix}/{kind}"] = _mean([value[it.id] for it in items if kind_of(it) == kind])
    return out


def ten_answer(rule: Callable[[str, Sequence[str]], float]) -> ScoreFn:
    """VQA-style accuracy with `rule`, overall and per answer type (the official reports' rows)."""

    def score(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
        acc = {it.id: rule(preds[it.id], it.answers) for it in items}
        return {"accuracy": _mean(list(acc.values())),
                **_rows_by(items, lambda it: it.meta.get("answer_type"), acc, "accuracy")}

    return score


def _gqa_kind(item: Item) -> str | None:
    """gqa eval.py: 'open' when the structural type is query, else 'binary'."""
    types = item.meta.get("types")
    return None if not types else ("open" if types.get("structural") == "query" else "binary")


def one_answer(rule: Callable[[str, str], float]) -> ScoreFn:
    """GQA-style accuracy: the single answer, with GQA's open (query) / binary split when the
    questions carry GQA's types."""

    def score(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
        acc = {it.id: rule(preds[it.id], it.answers[0]) for it in items}
        return {"accuracy": _mean(list(acc.values())), **_rows_by(items, _gqa_kind, acc, "accuracy")}

    return score


def tdiuc_rule(rule: Callable[[str, str], float]) -> ScoreFn:
    def score(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
        return M.mean_per_type((it.meta.get("question_type") or "all", it.answers[0], rule(preds[it.id], it.answers[0]))
                               for it in items)

    return score


# ---- ScienceQA ----------------------------------------------------------------------------------

_LLAVA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def llava_sqa_letter(text: str, n_choices: int) -> str | None:
    """LLaVA-1.5's eval_science_qa.py: the answer is the whole text when it is one letter A-E, the
    first character of an 'X. ...' answer, or the letter of exactly one 'The answer is X.'; a
    letter past the problem's choices (get_pred_idx) or anything else fails."""
    options = list(LETTERS)
    if text in options:
        letter = text
    elif len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        letter = text[0]
    else:
        found = _LLAVA_ANSWER_IS.findall(text)
        letter = found[0] if len(found) == 1 else None
    return letter if letter in options[:n_choices] else None


def chosen_letter(text: str, n_choices: int) -> str | None:
    """Lenient (not an official rule): any standalone letter A-E ('B', '(B)', 'B. cat', 'A cat')."""
    m = re.search(rf"\b([{LETTERS[:n_choices]}])\b", text.strip())
    return m.group(1) if m else None


def choice(parse: Callable[[str, int], str | None]) -> ScoreFn:
    def score(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
        return {"accuracy": _mean([float(parse(preds[it.id], len(it.meta.get("choices") or LETTERS)) == it.answers[0])
                                   for it in items])}

    return score


# ---- POPE ---------------------------------------------------------------------------------------

def score_pope(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
    """RUCAIBox/POPE evaluate.py over the items; a VLMEvalKit file's categories ('adversarial',
    or several joined by commas) also get accuracy and F1 each, a row counting in every category
    it names (VLMEvalKit's split)."""
    pairs = {it.id: (M.pope_answer(preds[it.id]), it.answers[0]) for it in items}
    out = M.pope_metrics(pairs.values())
    categories: dict[str, list[str]] = {}
    for it in items:
        for cat in (it.meta.get("category") or "").split(","):
            if cat.strip():
                categories.setdefault(cat.strip(), []).append(it.id)
    for cat in sorted(categories):
        part = M.pope_metrics(pairs[i] for i in categories[cat])
        out.update({f"accuracy/{cat}": part["accuracy"], f"f1/{cat}": part["f1"]})
    return out


# ---- captions -----------------------------------------------------------------------------------

def score_captions(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
    """pycocoevalcap's CIDEr-D and BLEU-4, tokenized by its own Java tokenizer when Java is on
    PATH (what published numbers used), else by the Java-free stand-in; the report says which.
    NoCaps' per-domain rows only when the file names domains."""
    jar = M.ptb_jar()
    notes.append(f"tokenizer: {M.tokenizer_name(jar is not None)}")
    scores = M.caption_scores({it.id: preds[it.id] for it in items}, {it.id: it.answers for it in items}, jar)
    out = {"cider": scores["cider"], "bleu4": scores["bleu4"]}
    domains = sorted({it.meta.get("domain") for it in items} - {None})
    if "domain" in (items[0].meta if items else {}) and not domains:
        notes.append("the captions file names no domain per image: no in-/near-/out-domain rows")
    for d in domains:
        part = [it for it in items if it.meta.get("domain") == d]
        out[f"cider/{d}"] = M.caption_scores({it.id: preds[it.id] for it in part},
                                             {it.id: it.answers for it in part}, jar)["cider"]
    return out


# ---- boxes --------------------------------------------------------------------------------------

def _first_box(text: str, size: tuple[int, int]) -> M.PixelBox | None:
    boxes = parse_boxes(text).boxes
    return M.box_to_pixels(boxes[0], *size) if boxes else None


def score_rec(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
    hits = []
    for it in items:
        box = _first_box(preds[it.id], it.meta["size"])
        hits.append(float(box is not None and M.pixel_iou(box, it.meta["box"]) >= 0.5))
    return {"acc@0.5": _mean(hits)}


def score_pointing(items: Sequence[Item], preds: Predictions, notes: list[str]) -> dict[str, float]:
    """Right when the predicted box overlaps the right candidate most (IoU), as a pick among four.
    The 0-999 boxes are scaled by each image's size, which only the image files hold."""
    missing = [it.image for it in items if it.meta["size"] is None]
    if missing:
        raise UsageError(f"Visual7W's boxes are scaled by each image's size: {len(missing)} images not found, "
                         f"e.g. {missing[0]}; give --images (only their sizes are read)")
    hits = []
    for it in items:
        box = _first_box(preds[it.id], it.meta["size"])
        if box is None:
            hits.append(0.0)
            continue
        ious = [M.pixel_iou(box, c) for c in it.meta["candidates"]]
        hits.append(float(max(ious) > 0 and ious.index(max(ious)) == it.meta["answer"]))
    return {"accuracy": _mean(hits)}


GT_VQA = "GT-Vision-Lab/VQA PythonEvaluationTools/vqaEvaluation/vqaEval.py"
LENIENT = "ours, not an official scorer: both sides normalized (case, punctuation, number words, articles)"

VQA_2016 = Scorer("vqa-2016", ten_answer(M.vqa_2016_accuracy), f"{GT_VQA} @ 458a8b2 (2016; rules as at c4e6a0e)")
VQA_2021 = Scorer("vqa-2021", ten_answer(M.vqa_2021_accuracy),
                  f"{GT_VQA} @ a013f00 (2021, 'Fixed processing answers bug')")
EVALAI_VQA = Scorer("evalai-vqa", ten_answer(M.evalai_challenge_accuracy),
                    "Cloud-CV/VQA-Challenge PythonEvaluationTools/vqaEvaluation/vqaEval.py @ 50c6b1e "
                    "(the code EvalAI runs for VQAv2 test-dev)")
M4C = Scorer("m4c", ten_answer(M.m4c_accuracy),
             "facebookresearch/mmf mmf/utils/m4c_evaluators.py @ 2dc099a TextVQAAccuracyEvaluator "
             "(EvalAIAnswerProcessor)")
VIZWIZ = Scorer("vizwiz", ten_answer(M.vizwiz_accuracy),
                "the VizWiz-VQA API's vqaEval.py (Qing Li; linked from vizwiz.org/tasks-and-datasets/vqa)")
GQA = Scorer("gqa", one_answer(M.exact_match),
             "GQA's eval.py (cs.stanford.edu/people/dorarad/gqa/evaluate.html): raw `predicted == gold`, "
             "isBalanced questions only")
TDIUC = Scorer("tdiuc", tdiuc_rule(M.exact_match),
               "TDIUC (kushalkafle.com/projects/tdiuc.html): the answer label compared as a string, "
               "mean-per-type accuracy (MPT, N-MPT)")
LLAVA_SQA = Scorer("llava-sqa", choice(llava_sqa_letter), "haotian-liu/LLaVA llava/eval/eval_science_qa.py (LLaVA-1.5)")
POPE = Scorer("pope", score_pope, "RUCAIBox/POPE evaluate.py; categories split as VLMEvalKit's POPE_rating")
COCO_CAPTION = Scorer("coco-caption", score_captions, "pycocoevalcap 1.2 (tylin/coco-caption): PTBTokenizer, Bleu, Cider")
REC = Scorer("iou@0.5", score_rec, "ours: Acc@0.5 of the first box, as the CogVLM paper reports REC "
                                   "(docs/spec/cogvlm.md §8); the publishers ship no script")
POINTING = Scorer("v7w-pointing", score_pointing, "ours: the candidate the box overlaps most; Visual7W ships no "
                                                  "script for box answers")
LENIENT_TEN = Scorer("lenient", ten_answer(M.m4c_accuracy), LENIENT, official=False)
LENIENT_ONE = Scorer("lenient", one_answer(M.lenient_exact), LENIENT, official=False)
LENIENT_TDIUC = Scorer("lenient", tdiuc_rule(M.lenient_exact), LENIENT, official=False)
LENIENT_CHOICE = Scorer("lenient", choice(chosen_letter), "ours, not an official scorer: any standalone letter A-E",
                        official=False)


def scorer_for(task_name: str, scorers: Sequence[Scorer], chosen: str | None) -> Scorer:
    """The task's default scorer (its first), or the one named `chosen`; a UsageError when the
    task has no scorer of that name."""
    if chosen is None:
        return scorers[0]
    for s in scorers:
        if s.name == chosen:
            return s
    raise UsageError(f"--scorer {chosen} does not apply to --task {task_name}; its scorers: "
                     f"{', '.join(s.name for s in scorers)}")
