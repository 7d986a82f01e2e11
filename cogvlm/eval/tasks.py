"""The benchmarks: how each is read, asked, scored and submitted, and the numbers published for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import scorers as S
from .formats import Benchmark, Item
from .formats.captions import read_coco_captions, read_karpathy
from .formats.choice import read_pope, read_scienceqa
from .formats.grounding import read_refcoco, read_visual7w
from .formats.vqa import read_gqa, read_textvqa, read_vizwiz, read_vqa

Reader = Callable[[Sequence[Path], "Path | None", "str | None"], Benchmark]
Predictions = S.Predictions
PAPER = "CogVLM paper (arXiv:2311.03079), CogVLM-17B"
# second sources, as found on 2026-12-07 (docs/eval.md, Published numbers)
PWC = "Papers with Code's results for arXiv:2311.03079 (mirrored at wizwand.com/paper/68fa721c1e209131cea548b9)"
COGVLM_README = "THUDM/CogVLM README.md @ b37f36b (the authors' table)"
COGVLM2_README = "THUDM/CogVLM2 README.md @ 076055a (the benchmark table)"


@dataclass(frozen=True)
class Published:
    split: str
    metric: str
    value: float  # in the report's scale: percent, CIDEr x 100
    model: str
    source: str
    second_source: str | None = None  # where the value was checked; None: printed as unverified


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    reader: Reader
    scorers: tuple[S.Scorer, ...]  # the first is the default: the publisher's or server's scorer
    prompt: str  # key of prompts.PROMPTS
    max_new_tokens: int
    tsv_kind: str | None = None  # how a VLMEvalKit TSV row reads, if VLMEvalKit ships this benchmark
    submission: Callable[[Sequence[Item], Predictions], list[dict[str, Any]]] | None = None
    published: tuple[Published, ...] = field(default_factory=tuple)


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
    return Task(name, title, read_refcoco, (S.REC,), "rec", 48, published=tuple(
        Published(s, "acc@0.5", v, GROUNDING, GROUNDING_SOURCE, COGVLM_README) for s, v in numbers.items()))


VQA_SCORERS = (S.VQA_2021, S.VQA_2016, S.EVALAI_VQA, S.LENIENT_TEN)
CAPTION = (S.COCO_CAPTION,)

TASKS: dict[str, Task] = {t.name: t for t in (
    Task("vqav2", "VQAv2", read_vqa, (S.EVALAI_VQA, S.VQA_2021, S.VQA_2016, S.LENIENT_TEN), "short_answer", 16,
         "vqa", _by_question_id, (Published("test-dev2015", "accuracy", 82.3, PAPER, "paper Table 2", PWC),)),
    Task("okvqa", "OK-VQA", read_vqa, VQA_SCORERS, "short_answer", 16, "vqa", _by_question_id,
         (Published("val2014", "accuracy", 64.8, PAPER, "paper Table 2"),)),
    Task("textvqa", "TextVQA", read_textvqa, (S.M4C, S.LENIENT_TEN), "short_answer", 16, "vqa", _by_question_id, (
        Published("val", "accuracy", 70.4, PAPER, "paper Table 2", PWC),
        Published("val", "accuracy", 69.7, "cogvlm-chat-v1.1", "cogvlm2.md §11 (CogVLM1.1)", COGVLM2_README),
        Published("val", "accuracy", 84.2, "cogvlm2-llama3-chat-19B", "cogvlm2.md §11", COGVLM2_README),
        Published("val", "accuracy", 85.0, "cogvlm2-llama3-chinese-chat-19B", "cogvlm2.md §11", COGVLM2_README))),
    Task("vizwiz", "VizWiz-VQA", read_vizwiz, (S.VIZWIZ, S.M4C, S.LENIENT_TEN), "short_answer", 16, "vqa",
         _vizwiz_submission),
    Task("gqa", "GQA", read_gqa, (S.GQA, S.LENIENT_ONE), "short_answer", 16, "vqa", _gqa_submission),
    Task("scienceqa", "ScienceQA (image subset)", read_scienceqa, (S.LLAVA_SQA, S.LENIENT_CHOICE), "choice", 8,
         "choice", None,
         (Published("test", "accuracy", 91.2, PAPER, "paper, as listed by leaderboards (subset not stated there)", PWC),)),
    Task("coco", "COCO captions (Karpathy test)", read_karpathy, CAPTION, "caption", 64, "caption",
         _caption_submission, (Published("test", "cider", 148.7, PAPER, "paper Table 1", PWC),)),
    Task("nocaps", "NoCaps", read_coco_captions, CAPTION, "caption", 64, None, _caption_submission,
         (Published("val", "cider", 128.3, PAPER, "paper Table 1 (overall)"),)),
    Task("flickr30k", "Flickr30k (Karpathy test)", read_karpathy, CAPTION, "caption", 64, None,
         _caption_submission, (Published("test", "cider", 94.9, PAPER, "paper Table 1"),)),
    _rec("refcoco", "RefCOCO", {"val": 92.76, "testA": 94.75, "testB": 88.99}),
    _rec("refcoco+", "RefCOCO+", {"val": 88.68, "testA": 92.91, "testB": 83.39}),
    _rec("refcocog", "RefCOCOg", {"val": 89.75, "test": 90.79}),
    Task("visual7w", "Visual7W (pointing)", read_visual7w, (S.POINTING,), "pointing", 48,
         published=(Published("test", "accuracy", 91.05, GROUNDING, GROUNDING_SOURCE, COGVLM_README),)),
    Task("pope", "POPE", read_pope, (S.POPE,), "yes_no", 8, "yesno",
         published=(Published("adversarial", "accuracy", 87.6, PAPER, "cogvlm.md §8", COGVLM_README),)),
    Task("tdiuc", "TDIUC", read_vqa, (S.TDIUC, S.LENIENT_TDIUC), "short_answer", 16),
)}
