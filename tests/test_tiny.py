"""The shipped default model, cogvlm-tiny, reaches its targets on scenes it has never seen.

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
from cogvlm.data.synthetic import conversations, make_scene
from cogvlm.evaluate import score, task_of

# Training uses seed 0, its validation seed 1 and the recipe's test set seed 7; this seed is new.
HELD_OUT_SEED = 2026
N_SCENES = 60  # ~60 captions, ~150 referring expressions, ~120 VQA questions


@pytest.fixture(scope="module")
def held_out_scores(monkeypatch_module) -> dict[str, list[float]]:
    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")  # the default model needs no network
    vlm = CogVLM.from_pretrained()
    assert vlm.config.vision.image_size == 112 and vlm.config.template == "vqa"
    scores: dict[str, list[float]] = defaultdict(list)
    for i in range(N_SCENES):
        scene = make_scene(HELD_OUT_SEED * 1_000_003 + i, 112)
        for template, turns in conversations(scene, random.Random(HELD_OUT_SEED + i)):
            for k, (query, reference) in enumerate(turns):
                answer, _ = vlm.chat(scene.image, query, history=turns[:k], template=template, top_k=1)
                # (boxes in the answers are read by cogvlm.grounding.parse_boxes)
                for name, value in score(task_of(template, query, reference), answer, reference).items():
                    scores[name].append(value)
    return scores


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.mark.parametrize("metric, target", [("vqa_accuracy", 0.90), ("rec_acc@0.5", 0.80),
                                            ("caption_object_match", 0.80)])
def test_shipped_cogvlm_tiny_reaches_its_targets(held_out_scores, metric, target):
    values = held_out_scores[metric]
    assert len(values) >= N_SCENES  # every scene asked this task at least once
    assert sum(values) / len(values) >= target, f"{metric} {sum(values) / len(values):.3f} < {target}"
