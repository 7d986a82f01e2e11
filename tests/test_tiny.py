"""The shipped default model, cogvlm-tiny: it loads with no argument and no network, and answers
every task in its trained format about what is in the image, on scenes it has never seen.

(Its accuracy is measured by `cogvlm eval` in recipes/cogvlm-tiny.sh and reported in the README.)
"""

from __future__ import annotations

import random

from cogvlm import CogVLM
from cogvlm.data.synthetic import COLOURS, SHAPES, conversations, make_scene
from cogvlm.grounding import parse_boxes

HELD_OUT_SEED = 987_654  # the recipe trains on seed 0 and holds out seed 1
VQA_WORDS = set(COLOURS) | set(SHAPES) | {"yes", "no"} | {str(n) for n in range(10)}


def test_shipped_cogvlm_tiny_answers_in_format_about_the_image():
    vlm = CogVLM.from_pretrained()
    assert vlm.config.vision.image_size == 112 and vlm.config.template == "vqa"
    rec, vqa, captions = [], [], []
    for i in range(20):
        scene = make_scene(HELD_OUT_SEED + i, 112)
        for template, turns in conversations(scene, random.Random(i), tasks=("caption", "vqa", "rec")):
            query, _ = turns[0]
            answer, _ = vlm.chat(scene.image, query, template=template)
            (rec if "[[x0" in query else vqa if template == "vqa" else captions).append(answer)
    boxes = [parse_boxes(a) for a in rec]
    well_formed = [len(b.boxes) == 1 and not b.malformed for b in boxes]
    assert sum(well_formed) >= 0.9 * len(rec)
    assert len({tuple(vars(b.boxes[0]).values()) for b in boxes if b.boxes}) > 5  # depends on the image
    assert sum(a in VQA_WORDS for a in vqa) >= 0.9 * len(vqa)
    assert all(c.endswith(".") for c in captions) and len(set(captions)) > 3
