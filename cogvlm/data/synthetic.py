"""Synthetic scenes of simple shapes with conversations for every CogVLM task.

A tiny CogVLM trained from scratch on these scenes lets every task (captioning, VQA,
referring expressions, grounded captions, box captions) run and be tested offline. Everything
is deterministic from a seed. Each scene has 1-4 non-overlapping objects, unique in
(colour, shape), so "the red circle" always names exactly one thing.

    python -m cogvlm.data.synthetic OUT --n 1000 --seed 0 --size 112
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from ..files import atomic_path, write_text

Box = tuple[int, int, int, int]
Turns = list[tuple[str, str]]

# Fixed, far-apart RGB values: a tiny vision encoder must tell them apart at a glance.
COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
           "yellow": (230, 200, 20), "purple": (140, 60, 180), "orange": (245, 130, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.22, "large": 0.34}  # side as a share of the image side
TASKS = ("caption", "vqa", "rec", "grounded_caption", "box_caption")
MIN_IMAGE_SIZE = 16
MAX_OBJECTS = 4
# Query wording follows the CogVLM authors' grounding prompts, including the literal format hint.
REC_QUERY = "Where is the {}? answer in [[x0,y0,x1,y1]] format."
GROUNDED_QUERY = ("Can you provide a description of the image and include the coordinates "
                  "[[x0,y0,x1,y1]] for each mentioned object?")
BOX_QUERY = "Tell me what you see within the designated area {} in the picture."


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    box_px: Box  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    box: Box  # the same in thousandths of the image side, 0..999

    @property
    def name(self) -> str:
        """The referring expression without article: 'red circle'."""
        return f"{self.colour} {self.shape}"

    @property
    def description(self) -> str:
        """The caption phrase: 'a large red circle'."""
        return f"a {self.size} {self.colour} {self.shape}"

    @property
    def box_text(self) -> str:
        """CogVLM's grounding format: '[[086,540,400,760]]'."""
        return box_text([self.box])


@dataclass
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    seed: int


def thousandths(px: int, size: int) -> int:
    """A pixel coordinate as CogVLM's three-digit relative coordinate (1000 would need 4 digits)."""
    return min(999, round(px / size * 1000))


def box_text(boxes: Iterable[Box]) -> str:
    """'[[x0,y0,x1,y1;x0,y0,x1,y1]]' for one phrase's boxes, given in thousandths."""
    return "[[" + ";".join(",".join(f"{v:03d}" for v in b) for b in boxes) + "]]"


def make_scene(seed: int | random.Random, image_size: int = 224, min_objects: int = 1) -> Scene:
    """One scene of `min_objects` to 4 objects (fewer only if they do not fit); a
    `random.Random` is used to draw the scene's own seed, so that
    `make_scene(scene.seed, size, min_objects)` always reproduces the scene."""
    if isinstance(seed, random.Random):
        seed = seed.randrange(2**32)
    _check_scene_args(image_size, min_objects)
    rng = random.Random(seed)
    # Light background with low-amplitude grey noise: not a constant the model can key on.
    noise = np.random.default_rng(seed).integers(-8, 9, (image_size, image_size, 1))
    background = np.array([rng.randint(215, 250) for _ in range(3)])
    image = Image.fromarray(np.clip(background + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], rng.randint(min_objects, MAX_OBJECTS))
    margin = max(2, image_size // 40)
    objects: list[SceneObject] = []
    for colour, shape in kinds:
        size = rng.choice(list(SIZES))
        side = round(SIZES[size] * image_size)
        for _ in range(200):
            x0, y0 = rng.randint(0, image_size - side), rng.randint(0, image_size - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(_apart(box, o.box_px, margin) for o in objects):
                break
        else:
            continue  # no room left: fewer objects (the first one always fits)
        _draw(draw, shape, box, COLOURS[colour])
        rel = (thousandths(x0, image_size), thousandths(y0, image_size),
               thousandths(box[2], image_size), thousandths(box[3], image_size))
        objects.append(SceneObject(shape, colour, size, box, rel))
    return Scene(image, objects, seed)


def _check_scene_args(image_size: int, min_objects: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if not 1 <= min_objects <= MAX_OBJECTS:
        raise ValueError(f"min_objects must be between 1 and {MAX_OBJECTS}, got {min_objects}")


def _apart(a: Box, b: Box, margin: int) -> bool:
    """At least `margin` pixels of background between the two boxes, on some axis."""
    return (a[2] + margin <= b[0] or b[2] + margin <= a[0]
            or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: Box, rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1  # PIL's corners are inclusive
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _left_to_right(scene: Scene) -> list[SceneObject]:
    """A fixed reading order, so captions have one right answer."""
    return sorted(scene.objects, key=lambda o: (o.box[0] + o.box[2], o.box[1]))


def _join(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """'a large red circle and a small blue square.' (left to right)."""
    return _join([o.description for o in _left_to_right(scene)]) + "."


def grounded_caption(scene: Scene) -> str:
    """The caption with each phrase followed by its box."""
    return _join([f"{o.description} {o.box_text}" for o in _left_to_right(scene)]) + "."


def vqa_turns(scene: Scene, rng: random.Random, n: int) -> Turns:
    """`n` questions with one-word or digit answers, only ever asked when unambiguous;
    about 40% are yes/no, half of those answered yes."""
    objs = scene.objects
    pool: Turns = [("How many objects are there?", str(len(objs)))]
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            pool.append((f"What color is the {o.shape}?", o.colour))
        if sum(p.colour == o.colour for p in objs) == 1:
            pool.append((f"What shape is the {o.colour} object?", o.shape))
    present = sorted({(o.colour, o.shape) for o in objs})
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    turns: Turns = []
    for _ in range(n):
        if rng.random() < 0.4:
            if rng.random() < 0.5:
                (c, s), answer = rng.choice(present), "yes"
            else:
                (c, s), answer = rng.choice(absent), "no"
            turns.append((f"Is there a {c} {s}?", answer))
        else:
            turns.append(rng.choice(pool))
    return turns


def conversations(scene: Scene, rng: random.Random,
                  tasks: Iterable[str] = TASKS) -> list[tuple[str, Turns]]:
    """(template, turns) for each task: VQA gets 1-3 turns, the others one; REC is asked once
    per object because it is the hardest task to learn."""
    tasks = set(tasks)
    if tasks - set(TASKS):
        raise ValueError(f"unknown task(s) {sorted(tasks - set(TASKS))}; expected some of {TASKS}")
    out: list[tuple[str, Turns]] = []
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


# cogvlm-tiny trained on data seeds 0, 3-6 and 8-16 (recipes/cogvlm-tiny.sh), with seed 1 as its
# validation set and seed 7 as its test set; the defaults make a set it has never seen, at the
# image size it was trained at
TRAINING_SEEDS = frozenset({0, *range(3, 17)}) - {7}
DEFAULT_SEED = 1000
DEFAULT_SIZE = 112


def make_dataset(out_dir: str | Path, n_images: int, seed: int, image_size: int = DEFAULT_SIZE,
                 tasks: Iterable[str] = TASKS, min_objects: int = 1) -> Path:
    """Write `images/*.png` and `data.jsonl` (docs/data-format.md) under `out_dir`; return the
    JSONL path. The same arguments always give byte-identical files."""
    if n_images < 1:
        raise ValueError(f"n_images must be positive, got {n_images}")
    _check_scene_args(image_size, min_objects)  # before any folder is made
    tasks = tuple(tasks)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_images):
        scene_seed = seed * 1_000_003 + i
        scene = make_scene(scene_seed, image_size, min_objects)
        name = f"images/{seed}-{i:06d}.png"
        with atomic_path(out_dir / name) as tmp:
            scene.image.save(tmp, format="PNG")
        for template, turns in conversations(scene, random.Random(scene_seed + 1), tasks):
            lines.append(json.dumps({"image": name, "template": template,
                                     "turns": [{"query": q, "answer": a} for q, a in turns]}))
    target = out_dir / "data.jsonl"
    write_text(target, "\n".join(lines) + "\n")
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m cogvlm.data.synthetic",
        description="Write a synthetic shapes data set: OUT/images/*.png and OUT/data.jsonl.")
    ap.add_argument("out", type=Path, help="output folder")
    ap.add_argument("--n", type=int, default=100, help="number of images (default 100)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED,
                    help=f"seed; same seed, same files (default {DEFAULT_SEED}: a set cogvlm-tiny never saw; "
                         f"it trained on seeds {', '.join(map(str, sorted(TRAINING_SEEDS)))}; 1 and 7 were its validation "
                         "and test sets)")
    ap.add_argument("--size", type=int, default=DEFAULT_SIZE,
                    help=f"image side in pixels (default {DEFAULT_SIZE}, cogvlm-tiny's image size)")
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS),
                    help="tasks to write (default: all)")
    ap.add_argument("--min-objects", type=int, default=1,
                    help=f"fewest objects per scene, 1 to {MAX_OBJECTS} (default 1); "
                         "more gives more crowded scenes, the hard cases")
    args = ap.parse_args(argv)
    try:
        path = make_dataset(args.out, args.n, args.seed, args.size, args.tasks, args.min_objects)
    except ValueError as e:
        ap.error(str(e))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
