"""Synthetic scenes, the JSONL record format and the evaluation metrics."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from cogvlm.data.records import read_records
from cogvlm.data.synthetic import COLOURS, conversations, make_dataset, make_scene
from cogvlm.eval.jsonl import normalize_answer, object_set, score, task_of, vqa_accuracy
from cogvlm.grounding import parse_boxes


def test_scenes_are_deterministic_and_consistent():
    a, b, c = make_scene(11, 112), make_scene(11, 112), make_scene(12, 112)
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects
    assert a.image.tobytes() != c.image.tobytes()
    for seed in range(40):
        scene = make_scene(seed, 112)
        pixels = np.asarray(scene.image)
        assert 1 <= len(scene.objects) <= 4
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            x0, y0, x1, y1 = o.box_px
            assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112
            assert o.box == tuple(min(999, round(v / 112 * 1000)) for v in o.box_px)
            centre = pixels[(y0 + y1) // 2 + (y1 - y0) // 6, (x0 + x1) // 2]  # inside a triangle too
            assert tuple(centre) == COLOURS[o.colour]
        for i, o in enumerate(scene.objects):  # no overlaps
            for p in scene.objects[i + 1:]:
                assert o.box_px[2] <= p.box_px[0] or p.box_px[2] <= o.box_px[0] or \
                    o.box_px[3] <= p.box_px[1] or p.box_px[3] <= o.box_px[1]


def test_answers_match_the_scene():
    yes = no = 0
    for seed in range(200):
        scene = make_scene(seed, 112)
        for template, turns in conversations(scene, random.Random(seed)):
            for q, a in turns:
                if q == "How many objects are there?":
                    assert a == str(len(scene.objects))
                elif q.startswith("What color is the "):
                    shape = q.removeprefix("What color is the ").rstrip("?")
                    assert [o.colour for o in scene.objects if o.shape == shape] == [a]
                elif q.startswith("Is there a "):
                    c, s = q.removeprefix("Is there a ").rstrip("?").split()
                    assert a == ("yes" if any((o.colour, o.shape) == (c, s) for o in scene.objects) else "no")
                    yes, no = yes + (a == "yes"), no + (a == "no")
                elif q.startswith("Where is the "):
                    name = q.removeprefix("Where is the ").split("?")[0]
                    assert a == next(o.box_text for o in scene.objects if o.name == name)
                elif template == "base" and q == "":
                    assert object_set(a) == {o.description.removeprefix("a ") for o in scene.objects}
                elif "coordinates" in q:
                    assert sorted(parse_boxes(a).boxes, key=lambda b: (b.x0, b.y0)) == sorted(
                        (parse_boxes(o.box_text).boxes[0] for o in scene.objects), key=lambda b: (b.x0, b.y0))
    assert 0.35 <= yes / (yes + no) <= 0.65


def test_dataset_round_trips_and_bad_lines_are_reported(tmp_path):
    path = make_dataset(tmp_path / "d", n_images=5, seed=3, image_size=56)
    records, errors = read_records(path)
    assert errors == [] and len(records) >= 5 * 4
    assert all(r.image.is_file() for r in records)
    lines = path.read_text().splitlines()
    (path.parent / "images" / "junk.png").write_bytes(b"\x89PNG not really")
    bad = [lines[0], "{oops", json.dumps({"image": "images/none.png", "template": "vqa", "turns": [{"query": "q", "answer": "a"}]}),
           json.dumps({"image": "images/junk.png", "template": "vqa", "turns": [{"query": "q", "answer": "a"}]}),
           json.dumps({"image": None, "template": "poem", "turns": [{"query": "q", "answer": "a"}]}),
           json.dumps({"image": None, "template": "chat", "turns": []}), "", lines[1]]
    (path.parent / "bad.jsonl").write_text("\n".join(bad) + "\n")
    records, errors = read_records(path.parent / "bad.jsonl")
    assert [r.line for r in records] == [1, 8]
    assert [(e.line, e.message.split(":")[0].split(" ")[0]) for e in errors] == [
        (2, "invalid"), (3, "image"), (4, "unreadable"), (5, "unknown"), (6, "'turns'")]
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_metrics():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("The Red!") == "red"
    assert vqa_accuracy("red", ["red"]) == 1.0 and vqa_accuracy("blue", ["red"]) == 0.0
    # VQAv2: an answer given by 2 of 10 annotators scores 2/3 on average over leave-one-out sets
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((8 * 2 / 3 + 2 * 1 / 3) / 10)
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert task_of("base", "Where is the red circle? answer in [[x0,y0,x1,y1]] format.", "[[100,100,300,300]]") == "rec"
    assert score("rec", "[[110,100,300,310]]", "[[100,100,300,300]]")["rec_acc@0.5"] == 1.0
    assert score("rec", "[[300,300,500,500]]", "[[100,100,300,300]]")["rec_acc@0.5"] == 0.0
    assert score("rec", "no idea", "[[100,100,300,300]]")["rec_acc@0.5"] == 0.0
    assert score("caption", "a small blue square and a large red circle.",
                 "a large red circle and a small blue square.")["caption_object_match"] == 1.0
    assert score("caption", "a large red circle.", "a large red circle and a small blue square.")["caption_object_match"] == 0.0
    g = score("grounded_caption", "a red circle [[100,100,300,300]]", "a red circle [[100,100,300,300]] and a cat [[500,500,600,600]]")
    assert g["grounded_box_recall@0.5"] == 0.5 and g["grounded_object_match"] == 0.0
