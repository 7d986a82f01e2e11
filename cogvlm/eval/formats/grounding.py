"""Grounding files: RefCOCO / RefCOCO+ / RefCOCOg (`refs(…).p` + `instances.json`) and Visual7W
pointing (`dataset_v7w_pointing.json`). Boxes stay in image pixels here; the metric converts the
model's 0-999 boxes with each image's size."""

from __future__ import annotations

import io
import pickle
import pickletools
import random
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ...grounding import format_boxes, from_pixels
from ...errors import UsageError
from ..metrics import xywh_to_corners
from . import Benchmark, Item, find_image, load_json, rows_of


MAX_REFS_BYTES = 512 * 2**20  # refs(umd).p, the largest, is ~40 MB
# The opcodes that build plain data (what refs(…).p, a Python 2 pickle, holds), by pickletools'
# names: none names a class or calls anything (GLOBAL, REDUCE, BUILD, EXT*, PERSID, ... are absent).
DATA_OPCODES = frozenset({
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE",
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
    "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8",
    "EMPTY_LIST", "APPEND", "APPENDS", "LIST", "EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3",
    "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET", "ADDITEMS", "FROZENSET",
    "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE",
})


class _DataOnly(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only: a pickle that names any class or
    function (the way pickles run code) is refused instead of executed."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}: a refs file holds only plain data")


def _check_opcodes(data: bytes) -> None:
    """Walk the pickle's opcodes before unpickling it. pickle allocates a counted string or bytes
    at its declared length before reading it: `\\x8e` and 8 length bytes asked for 4.4 GB. Here a
    length must fit in the bytes that follow (pickletools reads what is there, never the length),
    and only DATA_OPCODES may appear."""
    for op, _, pos in pickletools.genops(data):
        if op.name not in DATA_OPCODES:
            raise pickle.UnpicklingError(f"opcode {op.name} at byte {pos} is not plain data")


def load_refs(path: Path) -> list[dict]:
    """The refs list of refs(unc).p / refs(umd).p / refs(google).p (Python 2 pickles)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_REFS_BYTES + 1)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) > MAX_REFS_BYTES:
        raise UsageError(f"{path} is over {MAX_REFS_BYTES} bytes: not a RefCOCO refs file")
    try:
        _check_opcodes(data)
        refs = _DataOnly(io.BytesIO(data), encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            OverflowError, MemoryError, RecursionError) as e:
        raise UsageError(f"{path} is not a plain-data refs pickle: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs) or \
            (refs and not {"ref_id", "ann_id", "image_id", "split", "sentences"} <= set(refs[0])):
        raise UsageError(f"{path} is not a RefCOCO refs list")
    return refs


def read_refcoco(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """One item per referring sentence of the split (default val), with its object's box."""
    refs_path = next((p for p in paths if p.suffix == ".p"), None)
    inst_path = next((p for p in paths if p.suffix == ".json"), None)
    if refs_path is None or inst_path is None:
        raise UsageError("--annotations needs the refs(…).p file and instances.json of the same folder")
    instances = load_json(inst_path)
    if not isinstance(instances, dict) or not {"images", "annotations"} <= set(instances):
        raise UsageError(f"{inst_path} is not a RefCOCO instances.json")
    with rows_of(inst_path, "annotation"):
        boxes = {a["id"]: a["bbox"] for a in instances["annotations"]}
    with rows_of(inst_path, "image"):
        pictures = {im["id"]: im for im in instances["images"]}
    split = split or "val"
    items = []
    for n, ref in enumerate(load_refs(refs_path)):
        with rows_of(refs_path, f"ref {n}"):
            if ref["split"] == split:
                items += _ref_items(ref, pictures, boxes, images)
    return Benchmark(split, items)


def _ref_items(ref: dict, pictures: dict, boxes: dict, images: Path | None) -> list[Item]:
    """One item per sentence of one ref."""
    pic = pictures[ref["image_id"]]
    name = pic.get("file_name") or f"COCO_train2014_{ref['image_id']:012d}.jpg"
    image = find_image(images, name, f"train2014/{name}")
    return [Item(f"{ref['ref_id']}/{sent['sent_id']}", image, {"expression": sent["sent"]}, [],
                 {"box": xywh_to_corners(*boxes[ref["ann_id"]]), "size": (pic["width"], pic["height"]),
                  "key": str(sent["sent_id"])}) for sent in ref["sentences"]]


def read_visual7w(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """Visual7W pointing: "which" questions answered by one of four boxes. The candidates are
    listed in the prompt in a fixed shuffled order (seeded by the question id)."""
    path = paths[0] if len(paths) == 1 else None
    if path is None:
        raise UsageError("--annotations takes dataset_v7w_pointing.json")
    data = load_json(path)
    if not isinstance(data, dict) or not {"images", "boxes"} <= set(data):
        raise UsageError(f"{path} is not Visual7W's dataset_v7w_pointing.json")
    boxes = {b["box_id"]: b for b in data["boxes"]}
    split = split or "test"
    items = []
    for im in data["images"]:
        if im["split"] != split:
            continue
        image = find_image(images, im["filename"], f"images/{im['filename']}")
        size = Image.open(image).size if image.is_file() else None  # the boxes need it; see score_pointing
        for qa in im["qa_pairs"]:
            ids = [qa["answer"], *qa["multiple_choices"]]
            random.Random(qa["qa_id"]).shuffle(ids)
            corners = [xywh_to_corners(boxes[i]["x"], boxes[i]["y"], boxes[i]["width"], boxes[i]["height"]) for i in ids]
            # without the image (scoring existing answers) there is no prompt to fill
            listed = " ".join(format_boxes([from_pixels(*c, *size)]) for c in corners) if size else ""
            items.append(Item(str(qa["qa_id"]), image, {"question": qa["question"], "candidates": listed}, [],
                              {"candidates": corners, "answer": ids.index(qa["answer"]), "size": size}))
    return Benchmark(split, items)
