"""The shipped default model, cogvlm-tiny, on scenes it has never seen.

It loads with no argument and no network, and is scored through the public API exactly as a
user would: `CogVLM.chat` on each image and question, grounding answers parsed by
`cogvlm.grounding.parse_boxes`, metrics as `cogvlm eval` computes them (VQAv2 normalization,
IoU >= 0.5, caption object sets). Targets: VQA >= 0.90, REC Acc@0.5 >= 0.80, captions >= 0.80.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from cogvlm import CogVLM
from cogvlm.data.synthetic import COLOURS, SHAPES, conversations, make_scene
from cogvlm.eval.jsonl import score, task_of
from cogvlm.grounding import parse_boxes

# Training uses seeds 0, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15 and 16, its validation seed 1 and the
# recipe's test set seed 7; this seed is new.
HELD_OUT_SEED = 2026
# 150 captions, ~380 referring expressions, ~290 VQA questions: with 60 scenes (116 questions)
# one answer decided whether VQA accuracy reached 0.90; with ~290 the standard error is ~0.02.
N_SCENES = 150
VQA_WORDS = set(COLOURS) | set(SHAPES) | {"yes", "no"} | {str(n) for n in range(10)}


@pytest.fixture(scope="module")
def held_out() -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    """(answers by task, scores by metric) for every turn of N_SCENES new scenes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # the default model needs no network
        vlm = CogVLM.from_pretrained()
    assert vlm.config.vision.image_size == 112 and vlm.config.template == "vqa"
    answers: dict[str, list[str]] = defaultdict(list)
    scores: dict[str, list[float]] = defaultdict(list)
    for i in range(N_SCENES):
        scene = make_scene(HELD_OUT_SEED * 1_000_003 + i, 112)
        for template, turns in conversations(scene, random.Random(HELD_OUT_SEED + i)):
            for k, (query, reference) in enumerate(turns):
                answer, _ = vlm.chat(scene.image, query, history=turns[:k], template=template, top_k=1)
                task = task_of(template, query, reference)
                answers[task].append(answer)
                for name, value in score(task, answer, reference).items():
                    scores[name].append(value)
    return answers, scores


def test_shipped_cogvlm_tiny_answers_in_format_about_the_image(held_out):
    answers, _ = held_out
    boxes = [parse_boxes(a) for a in answers["rec"]]
    assert sum(len(b.boxes) == 1 and not b.malformed for b in boxes) >= 0.9 * len(boxes)
    assert len({tuple(vars(b.boxes[0]).values()) for b in boxes if b.boxes}) > 10  # depends on the image
    assert sum(a in VQA_WORDS for a in answers["vqa"]) >= 0.9 * len(answers["vqa"])
    captions = answers["caption"]
    assert all(c.endswith(".") for c in captions) and len(set(captions)) > 10


@pytest.mark.parametrize("metric, target", [("vqa_accuracy", 0.90), ("rec_acc@0.5", 0.80),
                                            ("caption_object_match", 0.80)])
def test_shipped_cogvlm_tiny_reaches_its_targets(held_out, metric, target):
    values = held_out[1][metric]
    assert len(values) >= N_SCENES  # every scene asked this task at least once
    assert sum(values) / len(values) >= target, f"{metric} {sum(values) / len(values):.3f} < {target}"
