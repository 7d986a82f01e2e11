"""Tests for CogVLM grounding boxes: parsing, formatting, pixel conversion, IoU and drawing."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cogvlm.grounding import (PALETTE, Box, GroundedPhrase, draw_boxes, format_box, format_boxes,
                              from_pixels, iou, parse_boxes, to_pixels)

FAST = settings(max_examples=200, deadline=None)

coord = st.integers(0, 999)


@st.composite
def boxes(draw: st.DrawFn) -> Box:
    x0, x1 = sorted((draw(coord), draw(coord)))
    y0, y1 = sorted((draw(coord), draw(coord)))
    return Box(x0, y0, x1, y1)


# --- parsing examples -------------------------------------------------------------------------

def test_single_box() -> None:
    text = "There is a dog [[086,540,400,760]] on the grass."
    res = parse_boxes(text)
    assert [(p.phrase, p.boxes) for p in res.phrases] == [("There is a dog", [Box(86, 540, 400, 760)])]
    start, end = res.phrases[0].span
    assert text[start:end] == "[[086,540,400,760]]"
    assert res.malformed == []
    assert res.clean_text == "There is a dog on the grass."


def test_several_boxes_and_connective() -> None:
    text = "a red circle [[100,200,300,400]] and two squares [[500,500,600,600;700,700,800,800]]."
    res = parse_boxes(text)
    assert [p.phrase for p in res.phrases] == ["a red circle", "two squares"]
    assert res.phrases[1].boxes == [Box(500, 500, 600, 600), Box(700, 700, 800, 800)]
    assert res.boxes == [Box(100, 200, 300, 400), Box(500, 500, 600, 600), Box(700, 700, 800, 800)]
    assert res.clean_text == "a red circle and two squares."


@pytest.mark.parametrize("text, phrases", [
    ("a red circle [[1,2,3,4]] and a blue square [[5,6,7,8]]", ["a red circle", "a blue square"]),
    ("A man [[1,2,3,4]] with a hat [[5,6,7,8]]", ["A man", "a hat"]),
    ("the roof of a house [[1,2,3,4]]", ["the roof of a house"]),
    ("I see a cat. The dog [[1,2,3,4]] sleeps", ["The dog"]),
    ("Is it there? yes, the cup [[1,2,3,4]]; and the plate [[5,6,7,8]]", ["the cup", "the plate"]),
    ("first line\nsecond thing [[1,2,3,4]]", ["second thing"]),
    ("a cat, [[1,2,3,4]]", ["a cat"]),
])
def test_phrase_boundaries(text: str, phrases: list[str]) -> None:
    assert [p.phrase for p in parse_boxes(text).phrases] == phrases


def test_spaces_and_short_numbers_tolerated() -> None:
    res = parse_boxes("the cup [[86, 540,400,760]] and [[ 1 , 2 , 3 , 4 ; 5,6 ,7, 8 ]]")
    assert res.boxes == [Box(86, 540, 400, 760), Box(1, 2, 3, 4), Box(5, 6, 7, 8)]
    assert res.malformed == []


def test_authors_prompts() -> None:
    caption = parse_boxes("Can you provide a description of the image and include the coordinates "
                          "[[x0,y0,x1,y1]] for each mentioned object?")
    assert caption.phrases == [] and caption.malformed == ["[[x0,y0,x1,y1]]"]
    refer = parse_boxes("Where is the green triangle? answer in [[x0,y0,x1,y1]] format.")
    assert refer.phrases == [] and refer.malformed == ["[[x0,y0,x1,y1]]"]
    area = parse_boxes("Tell me what you see within the designated area [[086,540,400,760]] in the picture.")
    assert [(p.phrase, p.boxes) for p in area.phrases] == [
        ("Tell me what you see within the designated area", [Box(86, 540, 400, 760)])]
    assert area.clean_text == "Tell me what you see within the designated area in the picture."


def test_malformed_reported_good_still_parsed() -> None:
    bad = ["[[1,2,3]]", "[[1,2,3,4,5]]", "[[100,200,1000,400]]", "[[a,2,3,4]]", "[[300,2,100,4]]",
           "[[1,400,3,200]]", "[[1,2,3,4;]]", "[[]]", "[[-1,2,3,4]]", "[[1.5,2,3,4]]"]
    text = "a cat [[010,020,030,040]] " + " ".join(bad) + " a dog [[100,100,200,200]] end"
    res = parse_boxes(text)
    assert res.malformed == bad
    assert [(p.phrase, p.boxes) for p in res.phrases] == [
        ("a cat", [Box(10, 20, 30, 40)]), ("a dog", [Box(100, 100, 200, 200)])]
    assert res.clean_text == "a cat a dog end"


def test_stray_brackets_do_not_hide_boxes() -> None:
    res = parse_boxes("oops [[ a bird [[001,002,003,004]] ]]")
    assert res.boxes == [Box(1, 2, 3, 4)]
    assert res.phrases[0].phrase == "a bird"


def test_box_validates() -> None:
    with pytest.raises(ValueError):
        Box(0, 0, 1000, 10)
    with pytest.raises(ValueError):
        Box(5, 0, 4, 10)


def test_format() -> None:
    assert format_box(Box(86, 540, 400, 760)) == "[[086,540,400,760]]"
    assert format_boxes([Box(1, 2, 3, 4), Box(500, 500, 999, 999)]) == "[[001,002,003,004;500,500,999,999]]"


# --- properties -------------------------------------------------------------------------------

@FAST
@given(st.lists(boxes(), min_size=1, max_size=5),
       st.text(alphabet=st.characters(blacklist_characters="[]"), max_size=40))
def test_round_trip(bs: list[Box], phrase: str) -> None:
    text = phrase + " " + format_boxes(bs)
    res = parse_boxes(text)
    assert len(res.phrases) == 1 and res.malformed == []
    assert res.phrases[0].boxes == bs
    assert res.phrases[0].phrase in text


@FAST
@given(st.lists(st.from_regex(r"[a-z]{1,8}", fullmatch=True).filter(lambda w: w not in {"and", "with", "of"}),
                min_size=1, max_size=5),
       boxes())
def test_round_trip_phrase(words: list[str], box: Box) -> None:
    res = parse_boxes(" ".join(words) + " " + format_box(box) + ".")
    assert [(p.phrase, p.boxes) for p in res.phrases] == [(" ".join(words), [box])]


def check_invariants(text: str) -> None:
    res = parse_boxes(text)
    assert isinstance(res.clean_text, str) and res.clean_text == res.clean_text.strip()
    for p in res.phrases:
        start, end = p.span
        group = text[start:end]
        assert group.startswith("[[") and group.endswith("]]")
        assert parse_boxes(group).boxes == p.boxes and p.boxes
        assert "[" not in p.phrase and "]" not in p.phrase
    for raw in res.malformed:
        assert raw in text and parse_boxes(raw).malformed == [raw]


@FAST
@given(st.text())
def test_never_raises_on_any_text(text: str) -> None:
    check_invariants(text)


@FAST
@given(st.lists(st.sampled_from(["[[", "]]", "[", "]", "0", "12", "999", "1000", ",", ";", " ", "a",
                                 "x", ".", "\n", "and "]), max_size=40).map("".join))
@example("x [ y ] and [[1,2,3,4]] [[[[5,6,7,8]]]] [[9,9,9]]")
def test_never_raises_on_bracket_soup(text: str) -> None:
    check_invariants(text)


# --- pixels -----------------------------------------------------------------------------------

@FAST
@given(boxes(), st.integers(1, 5000), st.integers(1, 5000))
def test_pixel_round_trip(box: Box, w: int, h: int) -> None:
    back = from_pixels(*to_pixels(box, w, h), w, h)
    for a, b in zip((box.x0, box.y0, box.x1, box.y1), (back.x0, back.y0, back.x1, back.y1)):
        assert abs(a - b) <= 1


def test_pixels_known_and_clamped() -> None:
    assert to_pixels(Box(100, 100, 600, 800), 200, 100) == (20, 10, 120, 80)
    assert from_pixels(20, 10, 120, 80, 200, 100) == Box(100, 100, 600, 800)
    assert from_pixels(-50, -5, 300, 150, 200, 100) == Box(0, 0, 999, 999)
    assert from_pixels(120, 80, 20, 10, 200, 100) == Box(100, 100, 600, 800)


# --- iou --------------------------------------------------------------------------------------

def test_iou_known_cases() -> None:
    a = Box(0, 0, 100, 100)
    assert iou(a, a) == 1.0
    assert iou(a, Box(50, 0, 150, 100)) == pytest.approx(1 / 3)
    assert iou(a, Box(0, 0, 50, 50)) == pytest.approx(0.25)
    assert iou(a, Box(200, 200, 300, 300)) == 0.0
    assert iou(a, Box(100, 0, 200, 100)) == 0.0  # touching edges
    assert iou(Box(5, 5, 5, 5), Box(5, 5, 5, 5)) == 1.0
    assert iou(Box(5, 5, 5, 9), Box(5, 5, 5, 8)) == 0.0
    assert iou(Box(5, 5, 5, 9), a) == 0.0


# --- drawing ----------------------------------------------------------------------------------

def test_draw_box_and_label() -> None:
    image = Image.new("RGB", (200, 100), "white")
    box = from_pixels(20, 10, 120, 80, 200, 100)
    out = draw_boxes(image, [GroundedPhrase("a dog", [box], (0, 0))])
    colour = PALETTE[0]
    assert out.mode == "RGB" and out.size == (200, 100)
    for xy in [(20, 45), (21, 60), (120, 50), (70, 80), (70, 79), (119, 30)]:
        assert out.getpixel(xy) == colour, xy
    for xy in [(70, 50), (100, 70), (30, 60), (10, 90), (150, 50)]:
        assert out.getpixel(xy) == (255, 255, 255), xy
    assert image.getpixel((20, 45)) == (255, 255, 255)  # the input stays untouched
    # the label: a fill of the box colour holding contrasting text, near the top-left corner
    label = [out.getpixel((x, y)) for x in range(20, 60) for y in range(0, 30)]
    assert label.count(colour) > 50
    assert any(p in {(0, 0, 0), (255, 255, 255)} for p in label)


def test_distinct_colours_per_phrase() -> None:
    image = Image.new("RGB", (300, 300), "white")
    phrases = [GroundedPhrase("", [from_pixels(30 + 20 * i, 30, 50 + 20 * i, 290, 300, 300)], (0, 0))
               for i in range(len(PALETTE) + 1)]
    out = draw_boxes(image, phrases)
    left_edges = [out.getpixel((round(to_pixels(p.boxes[0], 300, 300)[0]), 200)) for p in phrases]
    assert left_edges[:-1] == list(PALETTE) and left_edges[-1] == PALETTE[0]
    assert len(set(PALETTE)) == len(PALETTE)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_draw_tiny_image_edge_boxes(mode: str) -> None:
    image = Image.new(mode, (32, 32))
    edge_boxes = [Box(0, 0, 999, 999), Box(990, 990, 999, 999)]
    phrases = [GroundedPhrase("a very long label that does not fit 北京 😀", edge_boxes, (0, 0)),
               GroundedPhrase("x", [Box(0, 0, 0, 0), Box(500, 0, 999, 10)], (0, 0))]
    out = draw_boxes(image, phrases)
    assert out.mode == "RGB" and out.size == (32, 32)
    assert out.getpixel((0, 16)) == PALETTE[0]


# ---- CogAgent's Grounded Operation lines (docs/spec/cogagent.md section 11) ------------------------------

AGENT_ANSWER = (
    'Plan: 1. Click the search box. 2. Type "CogVLM". 3. Press enter.\n'
    'Next Action: Type "CogVLM" into the search box.\n'
    "Grounded Operation:[combobox] Search -> TYPE: CogVLM at the box [[212,498,787,564]]"
)


def test_grounded_operation_fields():
    from cogvlm.grounding import Operation, parse_operations

    ops = parse_operations(AGENT_ANSWER)
    start = AGENT_ANSWER.index("Grounded")
    assert ops == [Operation("combobox", "Search", "TYPE", "CogVLM", (Box(212, 498, 787, 564),),
                             (start, len(AGENT_ANSWER)))]
    assert ops[0].description == "[combobox] Search -> TYPE: CogVLM"


@pytest.mark.parametrize("line, want", [
    ("Grounded Operation:[button] Google Search -> CLICK at the box [[100,200,300,400]]",
     ("button", "Google Search", "CLICK", "", ((100, 200, 300, 400),))),
    ("Grounded Operation: [link] Sign in -> CLICK at the box [[001,002,003,004]]  ",
     ("link", "Sign in", "CLICK", "", ((1, 2, 3, 4),))),
    ("Grounded Operation:[textbox] To: -> TYPE: a b -> c at the box [[010,020,030,040]]",  # ':' in label, '->' in text
     ("textbox", "To:", "TYPE", "a b -> c", ((10, 20, 30, 40),))),
    ("Grounded Operation:[page] Home -> SCROLL_DOWN", ("page", "Home", "SCROLL_DOWN", "", ())),
    ("Grounded Operation:[button] OK -> CLICK at the box [[900,100,800,200]]",  # corners out of order
     ("button", "OK", "CLICK", "", ())),
])
def test_grounded_operation_variants(line, want):
    from cogvlm.grounding import parse_operations

    op, = parse_operations("Next Action: do it.\n" + line + "\nthanks")
    assert (op.element, op.label, op.action, op.argument, tuple((b.x0, b.y0, b.x1, b.y1) for b in op.boxes)) == want


def test_operation_boxes_are_labelled_with_their_operation():
    """The drawing labels an operation's box with the operation, not with the words before it."""
    result = parse_boxes(AGENT_ANSWER + "\nthe logo [[000,000,100,100]]")
    assert [(p.phrase, p.boxes) for p in result.phrases] == [
        ("[combobox] Search -> TYPE: CogVLM", [Box(212, 498, 787, 564)]), ("the logo", [Box(0, 0, 100, 100)])]
    assert parse_boxes("no operation here").phrases == []
