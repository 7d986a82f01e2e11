"""Synthetic scenes of simple shapes with conversations for every CogVLM task.

Deterministic from a seed. Used to train the shipped `cogvlm-tiny` from scratch and to test
fine-tuning, evaluation and the surfaces offline. Each scene has 1-4 objects, unique in
(colour, shape) so that "the red circle" names exactly one thing.

    python -m cogvlm.data.synthetic OUT --n 1000 --seed 0 --size 112
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (230, 200, 20), "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.34}  # side as a share of the image side
TASKS = ("caption", "vqa", "rec", "grounded_caption", "box_caption")
REC_QUERY = "Where is the {}? answer in [[x0,y0,x1,y1]] format."
GROUNDED_QUERY = ("Can you provide a description of the image and include the coordinates "
                  "[[x0,y0,x1,y1]] for each mentioned object?")
BOX_QUERY = "Tell me what you see within the designated area {} in the picture."


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    box_px: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    box: tuple[int, int, int, int]  # the same in thousandths of the image side, 0..999

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def description(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def box_text(self) -> str:
        return "[[" + ",".join(f"{v:03d}" for v in self.box) + "]]"


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    seed: int


def thousandths(px: int, size: int) -> int:
    return min(999, round(px / size * 1000))


def make_scene(seed: int, image_size: int = 224) -> Scene:
    rng = random.Random(seed)
    noise = np.random.default_rng(seed).integers(-8, 9, (image_size, image_size, 1))
    background = np.array([rng.randint(215, 250) for _ in range(3)])
    pixels = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.randint(1, 4))
    objects: list[SceneObject] = []
    margin = max(2, image_size // 40)
    for colour, shape in kinds:
        size = rng.choice(list(SIZES))
        side = round(SIZES[size] * image_size)
        for _ in range(200):
            x0, y0 = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, o.box_px, margin) for o in objects):
                break
        else:
            continue  # no room left: fewer objects
        _draw(draw, shape, box, COLOURS[colour])
        objects.append(SceneObject(shape, colour, size, box,
                                   tuple(thousandths(v, image_size) for v in box)))
    return Scene(image, objects, seed)


def _apart(a, b, margin: int) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, rgb) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)


def _left_to_right(scene: Scene) -> list[SceneObject]:
    return sorted(scene.objects, key=lambda o: (o.box[0] + o.box[2], o.box[1]))


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    return _join([o.description for o in _left_to_right(scene)]) + "."


def grounded_caption(scene: Scene) -> str:
    return _join([f"{o.description} {o.box_text}" for o in _left_to_right(scene)]) + "."


def vqa_turns(scene: Scene, rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Questions whose answers are one word or digit; yes/no balanced."""
    objs = scene.objects
    pool: list[tuple[str, str]] = [("How many objects are there?", str(len(objs)))]
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            pool.append((f"What color is the {o.shape}?", o.colour))
        if sum(p.colour == o.colour for p in objs) == 1:
            pool.append((f"What shape is the {o.colour} object?", o.shape))
    present = {(o.colour, o.shape) for o in objs}
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    turns = []
    for _ in range(n):
        if rng.random() < 0.4:  # yes/no, half of them yes
            if rng.random() < 0.5:
                c, s, answer = *rng.choice(sorted(present)), "yes"
            else:
                c, s, answer = *rng.choice(absent), "no"
            turns.append((f"Is there a {c} {s}?", answer))
        else:
            turns.append(rng.choice(pool))
    return turns


def conversations(scene: Scene, rng: random.Random, tasks=TASKS) -> list[tuple[str, list[tuple[str, str]]]]:
    """(template, turns) for each task; REC once per object (it is the hardest task)."""
    out = []
    if "caption" in tasks:
        out.append(("base", [("", caption(scene))]))
    if "vqa" in tasks:
        out.append(("vqa", vqa_turns(scene, rng, rng.randint(1, 3))))
    if "rec" in tasks:
        out += [("base", [(REC_QUERY.format(o.name), o.box_text)]) for o in scene.objects]
    if "grounded_caption" in tasks:
        out.append(("base", [(GROUNDED_QUERY, grounded_caption(scene))]))
    if "box_caption" in tasks:
        o = rng.choice(scene.objects)
        out.append(("base", [(BOX_QUERY.format(o.box_text), o.description)]))
    return out


def make_dataset(out_dir: str | Path, n_images: int, seed: int, image_size: int = 224,
                 tasks=TASKS) -> Path:
    """Write `images/*.png` and `data.jsonl` (training format) under `out_dir`; returns the JSONL."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        scene_seed = seed * 1_000_003 + i
        scene = make_scene(scene_seed, image_size)
        name = f"images/{seed}-{i:06d}.png"
        scene.image.save(out_dir / name)
        for template, turns in conversations(scene, random.Random(scene_seed + 1), tasks):
            lines.append(json.dumps({"image": name, "template": template,
                                     "turns": [{"query": q, "answer": a} for q, a in turns]}))
    target = out_dir / "data.jsonl"
    tmp = target.with_suffix(".jsonl.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description="Write a synthetic shapes data set (images + JSONL).")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    args = ap.parse_args()
    print(f"wrote {make_dataset(args.out, args.n, args.seed, args.size)}")


if __name__ == "__main__":
    main()
