"""CogVLM visual grounding: parse, format, convert and draw `[[x0,y0,x1,y1]]` boxes.

CogVLM writes boxes as corner coordinates in thousandths of the image size (three
digits, origin top-left), e.g. "a red circle [[100,200,300,400]]"; several boxes for
one phrase are separated by ";". The box belongs to the noun phrase just before it.

CogAgent's agent answers end in a line such as
`Grounded Operation:[combobox] Search -> TYPE: CogVLM at the box [[212,498,787,564]]`
(docs/spec/cogagent.md section 11): `parse_operations` reads those, and such a box is labelled with
its operation rather than with the words before it.
"""

from __future__ import annotations

import math

import re
import string
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

# A `[[...]]` group with no brackets inside, so a stray "[[" never swallows a good group.
_GROUP = re.compile(r"\[\[([^\[\]]*)\]\]")
_COORD = re.compile(r"[0-9]{1,3}")
# Where a phrase starts: after a sentence end, a newline, a comma, a semicolon or a stray bracket.
_BOUNDARY = re.compile(r"[.?!]\s|[\n,;\[\]]")
_CONNECTIVE = re.compile(r"^(?:(?:and|with|of)\b\s*)+", re.IGNORECASE)
_TRIM = string.whitespace + string.punctuation

# Clearly distinct colours (after Sasha Trubetskoy's list), cycled per phrase.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (255, 225, 25), (128, 0, 0), (0, 0, 128),
)


@dataclass(frozen=True)
class Box:
    """A box in CogVLM's normalized thousandths (0..999), corners x0<=x1, y0<=y1."""

    x0: int
    y0: int
    x1: int
    y1: int

    def __post_init__(self) -> None:
        coords = (self.x0, self.y0, self.x1, self.y1)
        if not all(isinstance(c, int) and 0 <= c <= 999 for c in coords):
            raise ValueError(f"box coordinates must be ints in 0..999, got {coords}")
        if self.x1 < self.x0 or self.y1 < self.y0:
            raise ValueError(f"box corners out of order: {coords}")


@dataclass
class GroundedPhrase:
    """A noun phrase and the boxes the model attached to it; span locates `[[...]]` in the text."""

    phrase: str
    boxes: list[Box]
    span: tuple[int, int]


@dataclass
class ParseResult:
    """Everything found in a text: grounded phrases, unparsable groups, and the text without boxes."""

    phrases: list[GroundedPhrase] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    clean_text: str = ""

    @property
    def boxes(self) -> list[Box]:
        """All boxes of all phrases, in text order."""
        return [b for p in self.phrases for b in p.boxes]


@dataclass(frozen=True)
class Operation:
    """One `Grounded Operation:` line: the UI element (type in brackets, then its label), the action
    in capitals with its argument ("" when it takes none), and the element's boxes."""

    element: str
    label: str
    action: str
    argument: str
    boxes: tuple[Box, ...]
    span: tuple[int, int]  # of the whole line in the text

    @property
    def description(self) -> str:
        """The line without its prefix and box: what a drawing labels the box with."""
        element = f"[{self.element}] " if self.element else ""
        argument = f": {self.argument}" if self.argument else ""
        return f"{element}{self.label} -> {self.action}{argument}".strip()


_OPERATION = re.compile(
    r"Grounded Operation:[ \t]*(?:\[(?P<element>[^\]\n]*)\])?[ \t]*(?P<label>[^\n]*?)[ \t]*->[ \t]*"
    r"(?P<action>[A-Z][A-Z_]*(?:[ \t]+[A-Z_]+)*)\b(?:[ \t]*:[ \t]*(?P<argument>[^\n]*?))?"
    r"(?:[ \t]*at the box[ \t]*\[\[(?P<box>[^\[\]\n]*)\]\])?[ \t]*$", re.MULTILINE)


def parse_operations(text: str) -> list[Operation]:
    """Every `Grounded Operation:` line of a CogAgent answer, in order; a line whose box is not
    a valid CogVLM box keeps its other fields and no box."""
    ops = []
    for m in _OPERATION.finditer(text):
        boxes = _parse_group(m.group("box")) if m.group("box") is not None else []
        ops.append(Operation((m.group("element") or "").strip(), m.group("label").strip(), m.group("action"),
                             (m.group("argument") or "").strip(), tuple(boxes or ()), m.span()))
    return ops


def _parse_group(body: str) -> list[Box] | None:
    """The boxes of one group's inside, or None when any part of it is not a valid box."""
    boxes = []
    for part in body.split(";"):
        coords = [c.strip() for c in part.split(",")]
        if len(coords) != 4 or not all(_COORD.fullmatch(c) for c in coords):
            return None
        x0, y0, x1, y1 = map(int, coords)
        if x1 < x0 or y1 < y0:
            return None
        boxes.append(Box(x0, y0, x1, y1))
    return boxes


def _phrase_before(segment: str) -> str:
    """The noun phrase at the end of `segment`: back to the last boundary, minus a connective."""
    segment = segment.rstrip(_TRIM)
    starts = [m.end() for m in _BOUNDARY.finditer(segment)]
    phrase = segment[starts[-1] if starts else 0:].strip(_TRIM)
    return _CONNECTIVE.sub("", phrase).strip(_TRIM)


def parse_boxes(text: str) -> ParseResult:
    """Find every `[[...]]` group in model text; bad groups go to `malformed`, never raising."""
    result = ParseResult()
    pieces, prev = [], 0
    operations = parse_operations(text)
    for m in _GROUP.finditer(text):
        boxes = _parse_group(m.group(1))
        if boxes is None:
            result.malformed.append(m.group(0))
        else:
            op = next((o.description for o in operations if o.span[0] <= m.start() < o.span[1]), None)
            phrase = op if op is not None else _phrase_before(text[prev:m.start()])
            result.phrases.append(GroundedPhrase(phrase, boxes, m.span()))
        pieces.append(text[prev:m.start()].rstrip(" \t"))
        prev = m.end()
    pieces.append(text[prev:])
    lines = "".join(pieces).split("\n")
    result.clean_text = "\n".join(re.sub(r"[ \t]{2,}", " ", ln).strip(" \t") for ln in lines).strip()
    return result


def format_box(box: Box) -> str:
    """One box as CogVLM writes it, e.g. "[[086,540,400,760]]"."""
    return format_boxes([box])


def format_boxes(boxes: list[Box]) -> str:
    """Several boxes for one phrase, ";"-separated in a single group."""
    return "[[" + ";".join(f"{b.x0:03d},{b.y0:03d},{b.x1:03d},{b.y1:03d}" for b in boxes) + "]]"


def to_pixels(box: Box, width: int, height: int) -> tuple[float, float, float, float]:
    """Box corners in pixels of a width x height image."""
    return (box.x0 * width / 1000, box.y0 * height / 1000,
            box.x1 * width / 1000, box.y1 * height / 1000)


def from_pixels(x0: float, y0: float, x1: float, y1: float, width: int, height: int) -> Box:
    """Pixel corners (any order) to a normalized box, rounded and clamped to 0..999."""
    def norm(v: float, size: int) -> int:
        return min(999, max(0, round(v * 1000 / size)))

    xs = sorted((norm(x0, width), norm(x1, width)))
    ys = sorted((norm(y0, height), norm(y1, height)))
    return Box(xs[0], ys[0], xs[1], ys[1])


def iou(a: Box, b: Box) -> float:
    """Intersection over union on continuous coordinates; zero-area boxes match only themselves."""
    iw = max(0, min(a.x1, b.x1) - max(a.x0, b.x0))
    ih = max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = iw * ih
    union = (a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter
    if union <= 0:
        return 1.0 if a == b else 0.0
    return inter / union


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at `size`, or its fixed bitmap font when FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _text_colour(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light fills, white on dark ones (Rec. 601 luma)."""
    r, g, b = rgb
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


DRAW_MIN_SIDE = 448


def drawable(image: Image.Image, min_side: int = DRAW_MIN_SIDE) -> Image.Image:
    """`image` enlarged by a whole factor (nearest neighbour, so pixels stay sharp) until its
    shorter side reaches `min_side`: on a small image (cogvlm-tiny's are 112 px) the labels would
    otherwise cover the very objects they name. Larger images are returned as they are."""
    factor = math.ceil(min_side / min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def draw_boxes(image: Image.Image, phrases: list[GroundedPhrase]) -> Image.Image:
    """An RGB copy of `image` with each phrase's boxes outlined and labelled in its own colour."""
    out = image.convert("RGB")  # always a new image, so the caller's stays untouched
    w, h = out.size
    draw = ImageDraw.Draw(out)
    line = max(2, min(w, h) // 150)
    font = _font(max(10, min(w, h) // 30))
    pad = 2
    for i, gp in enumerate(phrases):
        colour = PALETTE[i % len(PALETTE)]
        label = gp.phrase
        if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap font only knows latin-1
            label = label.encode("latin-1", "replace").decode("latin-1")
        for box in gp.boxes:
            px0, py0, px1, py1 = (round(v) for v in to_pixels(box, w, h))
            px0, px1 = min(px0, w - 1), min(max(px1, px0), w - 1)
            py0, py1 = min(py0, h - 1), min(max(py1, py0), h - 1)
            draw.rectangle((px0, py0, px1, py1), outline=colour, width=line)
            if not label:
                continue
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            lw, lh = right - left + 2 * pad, bottom - top + 2 * pad
            lx = max(0, min(px0, w - lw))
            ly = py0 - lh if py0 - lh >= 0 else max(0, min(py0, h - lh))
            draw.rectangle((lx, ly, lx + lw - 1, ly + lh - 1), fill=colour)
            draw.text((lx + pad - left, ly + pad - top), label, font=font, fill=_text_colour(colour))
    return out


def turn_boxes(query: str, answer: str) -> list[GroundedPhrase]:
    """What to draw for one turn: boxes the question points at (unlabelled), then the answer's."""
    asked = [GroundedPhrase("", p.boxes, p.span) for p in parse_boxes(query).phrases]
    return asked + parse_boxes(answer).phrases
