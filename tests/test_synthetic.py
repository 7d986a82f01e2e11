"""The synthetic scene generator, its task conversations and the JSONL record reader."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cogvlm.data.records import read_records
from cogvlm.data.synthetic import (BOX_QUERY, COLOURS, GROUNDED_QUERY, REC_QUERY, SHAPES, SIZES, TASKS,
                                   Scene, box_text, conversations, main, make_dataset, make_scene)

SIZE = 112
BOX = re.compile(r"\[\[(\d{3}),(\d{3}),(\d{3}),(\d{3})\]\]")


def _boxes(text: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in m) for m in BOX.findall(text)]


def _scenes(n: int = 100) -> list[Scene]:
    return [make_scene(seed, SIZE) for seed in range(n)]


def test_scenes_are_deterministic():
    a, b, c = make_scene(11, SIZE), make_scene(11, SIZE), make_scene(12, SIZE)
    assert a.image.tobytes() == b.image.tobytes() and a.objects == b.objects
    assert a.image.tobytes() != c.image.tobytes()
    from_rng = make_scene(random.Random(5), SIZE)  # reproducible from the seed it records
    assert from_rng.image.tobytes() == make_scene(from_rng.seed, SIZE).image.tobytes()
    assert from_rng.image.tobytes() == make_scene(random.Random(5), SIZE).image.tobytes()
    assert a.image.size == (SIZE, SIZE) and make_scene(11).image.size == (224, 224)


def test_datasets_are_deterministic(tmp_path):
    paths = [make_dataset(tmp_path / name, 4, seed, 56) for name, seed in (("a", 7), ("b", 7), ("c", 8))]
    texts = [p.read_bytes() for p in paths]
    assert texts[0] == texts[1] and texts[0] != texts[2]
    images = [sorted((p.parent / "images").iterdir()) for p in paths]
    assert [f.name for f in images[0]] == [f.name for f in images[1]] and len(images[0]) == 4
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(images[0], images[1]))
    assert images[0][0].read_bytes() != images[2][0].read_bytes()
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave nothing behind


def test_scene_geometry_and_pixels():
    margin = max(2, SIZE // 40)
    seen = set()
    for scene in _scenes():
        pixels = np.asarray(scene.image).astype(int)
        assert 1 <= len(scene.objects) <= 4
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        outside = np.ones((SIZE, SIZE), bool)
        for o in scene.objects:
            seen.add((o.colour, o.shape, o.size))
            x0, y0, x1, y1 = o.box_px
            assert 0 <= x0 < x1 <= SIZE and 0 <= y0 < y1 <= SIZE
            assert x1 - x0 == y1 - y0 == round(SIZES[o.size] * SIZE)
            assert o.box == tuple(min(999, round(v / SIZE * 1000)) for v in o.box_px)
            assert o.box_text == "[[" + ",".join(f"{v:03d}" for v in o.box) + "]]"
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            if o.shape == "triangle":
                cy += (y1 - y0) // 6  # the centroid sits below the box centre
            assert tuple(pixels[cy, cx]) == COLOURS[o.colour], (scene.seed, o)
            outside[y0:y1, x0:x1] = False
        for i, o in enumerate(scene.objects):  # apart by at least the margin on some axis
            for p in scene.objects[i + 1:]:
                a, b = o.box_px, p.box_px
                assert (a[2] + margin <= b[0] or b[2] + margin <= a[0]
                        or a[3] + margin <= b[1] or b[3] + margin <= a[1]), (scene.seed, o, p)
        # No object colour outside the objects' boxes: the background is light and only lightly noisy.
        distance = np.stack([np.abs(pixels - np.array(rgb)).sum(-1) for rgb in COLOURS.values()]).min(0)
        assert distance[outside].min() > 60, scene.seed
        corners = [(0, 0), (0, SIZE - 1), (SIZE - 1, 0), (SIZE - 1, SIZE - 1)]
        y, x = next((y, x) for y, x in corners if outside[y, x])
        assert tuple(pixels[y, x]) not in COLOURS.values() and pixels[y, x].min() >= 200
    assert {c for c, _, _ in seen} == set(COLOURS) and {s for _, s, _ in seen} == set(SHAPES)
    assert {z for _, _, z in seen} == set(SIZES)


def test_box_text_format():
    assert box_text([(86, 540, 400, 760)]) == "[[086,540,400,760]]"
    assert box_text([(0, 5, 999, 10), (1, 2, 3, 4)]) == "[[000,005,999,010;001,002,003,004]]"
    # A box touching the right/bottom edge is clamped to 999 (three digits).
    touching = [o for s in _scenes() for o in s.objects if o.box_px[2] == SIZE or o.box_px[3] == SIZE]
    assert touching and all(max(o.box) == 999 for o in touching)


def test_answers_match_the_scene():
    yes = no = 0
    seen_tasks = set()
    for scene in _scenes(200):
        objs = scene.objects
        by_name = {o.name: o for o in objs}
        ordered = sorted(objs, key=lambda o: (o.box[0] + o.box[2], o.box[1]))  # ties: top first
        convs = conversations(scene, random.Random(scene.seed))
        assert sum(q.startswith("Where is") for _, t in convs for q, _ in t) == len(objs)
        for template, turns in convs:
            assert template in ("base", "vqa") and 1 <= len(turns) <= (3 if template == "vqa" else 1)
            for q, a in turns:
                if template == "vqa":
                    seen_tasks.add("vqa")
                    assert re.fullmatch(r"[a-z]+|\d", a), a
                    if q == "How many objects are there?":
                        assert a == str(len(objs))
                    elif m := re.fullmatch(r"What color is the (\w+)\?", q):
                        assert [o.colour for o in objs if o.shape == m[1]] == [a]
                    elif m := re.fullmatch(r"What shape is the (\w+) object\?", q):
                        assert [o.shape for o in objs if o.colour == m[1]] == [a]
                    elif m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
                        assert a == ("yes" if f"{m[1]} {m[2]}" in by_name else "no")
                        yes, no = yes + (a == "yes"), no + (a == "no")
                    else:
                        pytest.fail(f"unexpected question {q!r}")
                elif q == "":
                    seen_tasks.add("caption")
                    expected = [o.description for o in ordered]
                    assert a == (expected[0] if len(expected) == 1 else
                                 ", ".join(expected[:-1]) + " and " + expected[-1]) + "."
                elif m := re.fullmatch(r"Where is the (\w+ \w+)\? answer in \[\[x0,y0,x1,y1\]\] format\.", q):
                    seen_tasks.add("rec")
                    assert q == REC_QUERY.format(m[1]) and a == by_name[m[1]].box_text
                elif q == GROUNDED_QUERY:
                    seen_tasks.add("grounded_caption")
                    assert _boxes(a) == [o.box for o in ordered]
                    assert re.sub(r" \[\[[\d,]+\]\]", "", a) == next(t[0][1] for _, t in convs if t[0][0] == "")
                else:
                    seen_tasks.add("box_caption")
                    [box] = _boxes(q)
                    assert q == BOX_QUERY.format(box_text([box]))
                    assert a == next(o.description for o in objs if o.box == box)
    assert seen_tasks == set(TASKS)
    assert 0.35 <= yes / (yes + no) <= 0.65, (yes, no)


def test_conversations_respect_tasks():
    scene = make_scene(3, SIZE)
    only = conversations(scene, random.Random(0), tasks=("caption",))
    assert only == [("base", [("", only[0][1][0][1])])]
    with pytest.raises(ValueError, match="unknown task"):
        conversations(scene, random.Random(0), tasks=("poem",))


def test_dataset_round_trips_through_read_records(tmp_path):
    path = make_dataset(tmp_path / "d", n_images=6, seed=3, image_size=56)
    assert path == tmp_path / "d" / "data.jsonl"
    records, errors = read_records(path)
    assert errors == [] and len(records) >= 6 * 5
    assert sum(r.template == "vqa" for r in records) == 6
    assert sum(r.turns[0][0] == "" for r in records) == 6
    for r in records:
        assert r.image is not None and r.image.parent == path.parent / "images"
        with Image.open(r.image) as img:
            assert img.size == (56, 56) and img.mode == "RGB"
    assert [r.line for r in records] == list(range(1, len(records) + 1))


def test_bad_lines_are_reported_with_line_numbers(tmp_path):
    path = make_dataset(tmp_path / "d", n_images=2, seed=0, image_size=56)
    good = [line for line in path.read_text().splitlines() if '"answer": "[[' in line]  # short answers
    (path.parent / "images" / "junk.png").write_bytes(random.Random(0).randbytes(500))
    ok_turns = [{"query": "q", "answer": "a"}]
    lines = [
        good[0],                                                                          # 1 ok
        "{oops",                                                                          # 2
        json.dumps({"image": "images/none.png", "template": "vqa", "turns": ok_turns}),   # 3
        json.dumps({"image": "images/junk.png", "template": "vqa", "turns": ok_turns}),   # 4
        json.dumps({"image": None, "template": "poem", "turns": ok_turns}),               # 5
        json.dumps({"image": None, "template": "chat", "turns": []}),                     # 6
        "",                                                                               # 7 ignored
        json.dumps({"image": None, "template": "chat", "turns": ok_turns}),               # 8 ok, text-only
        json.dumps({"template": "chat", "turns": ok_turns}),                              # 9
        json.dumps({"image": None, "template": "chat", "turns": [{"query": "q", "answer": 3}]}),  # 10
        json.dumps({"image": None, "template": "chat", "turns": [{"query": "q", "answer": "x" * 50}]}),  # 11
        "[1, 2]",                                                                         # 12
        good[1],                                                                          # 13 ok
    ]
    bad = path.parent / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    records, errors = read_records(bad, max_answer_chars=40)
    assert [r.line for r in records] == [1, 8, 13]
    assert records[1].image is None and records[1].turns == [("q", "a")]
    expected = {2: "invalid JSON", 3: "image not found", 4: "unreadable image", 5: "unknown template",
                6: "'turns' must be a non-empty list", 9: "missing key(s): image", 10: "turn 1 needs string",
                11: "over the limit of 40", 12: "invalid record"}
    assert [e.line for e in errors] == sorted(expected)
    for e in errors:
        assert expected[e.line] in e.message, e
    # Without the image check or the length limit, those lines are kept.
    records, errors = read_records(bad, check_images=False)
    assert {r.line for r in records} == {1, 3, 4, 8, 11, 13}
    with pytest.raises(FileNotFoundError, match="data file not found"):
        read_records(tmp_path / "missing.jsonl")


def test_absolute_image_paths_and_bad_utf8(tmp_path):
    image = tmp_path / "x.png"
    make_scene(0, 32).image.save(image)
    data = tmp_path / "sub" / "data.jsonl"
    data.parent.mkdir()
    data.write_bytes(json.dumps({"image": str(image), "template": "base",
                                 "turns": [{"query": "", "answer": "a"}]}).encode() + b"\n\xff\xfe\n")
    records, errors = read_records(data)
    assert [r.image for r in records] == [image]
    assert [(e.line, e.message.split(" at ")[0]) for e in errors] == [(2, "invalid UTF-8")]


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "--seed" in capsys.readouterr().out
    main([str(tmp_path / "out"), "--n", "3", "--seed", "1", "--size", "40", "--tasks", "rec"])
    records, errors = read_records(tmp_path / "out" / "data.jsonl")
    assert errors == [] and records and all(_boxes(r.turns[0][1]) for r in records)
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 3
    assert str(tmp_path / "out" / "data.jsonl") in capsys.readouterr().out


def test_min_objects_gives_crowded_scenes(tmp_path, capsys):
    # The default is the 1-to-4 object mix, unchanged: seeded data sets made before the
    # option existed are still reproduced byte for byte.
    assert all(make_scene(s, SIZE).image.tobytes() == make_scene(s, SIZE, 1).image.tobytes()
               for s in range(20))
    counts = [len(make_scene(s, SIZE, min_objects=3).objects) for s in range(100)]
    # Three or four, unless a large object left no room (about 1 scene in 50 at 112 px).
    assert min(counts) >= 2 and sum(c >= 3 for c in counts) >= 95 and {3, 4} <= set(counts)
    assert min(len(s.objects) for s in _scenes()) == 1
    with pytest.raises(ValueError, match="between 1 and 4"):
        make_scene(0, SIZE, min_objects=5)
    main([str(tmp_path / "out"), "--n", "5", "--seed", "2", "--size", "112", "--min-objects", "4",
          "--tasks", "rec"])
    records, _ = read_records(tmp_path / "out" / "data.jsonl")
    assert len(records) == 5 * 4  # one REC question per object
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "bad"), "--min-objects", "0"])
    assert exit_.value.code == 2 and "min_objects must be between 1 and 4" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--size", "8"])
    assert not (tmp_path / "bad").exists()


def test_defaults_suit_the_shipped_model(tmp_path, capsys):
    """Without flags: cogvlm-tiny's image size, and a seed none of its training, validation or
    test sets used (the recipe's seeds, read from the recipe itself)."""
    from cogvlm.data.synthetic import DEFAULT_SEED, TRAINING_SEEDS

    recipe = (Path(__file__).resolve().parent.parent / "recipes" / "cogvlm-tiny.sh").read_text()
    # every seed the recipe names (data and training), and later_stage's data seed argument
    used = {int(s) for s in re.findall(r"--seed \"?(\d+)", recipe)}
    used |= {int(s) for s in re.findall(r"^later_stage \d+ (\d+)", recipe, re.M)}
    assert TRAINING_SEEDS | {1, 7} <= used and DEFAULT_SEED not in used
    main([str(tmp_path / "out"), "--n", "1"])
    with Image.open(next((tmp_path / "out" / "images").glob("*.png"))) as image:
        assert image.size == (112, 112)
    config = json.loads((Path(__file__).resolve().parent.parent / "cogvlm" / "weights" / "cogvlm-tiny" /
                         "config.json").read_text())
    assert config["vision_config"]["image_size"] == 112
