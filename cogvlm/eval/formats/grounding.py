"""Grounding files: RefCOCO / RefCOCO+ / RefCOCOg (`refs(…).p` + `instances.json`) and Visual7W
pointing (`dataset_v7w_pointing.json`). Boxes stay in image pixels here; the metric converts the
model's 0-999 boxes with each image's size."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from ...grounding import format_boxes, from_pixels
from ...errors import UsageError
from ..metrics import xywh_to_corners
from . import Benchmark, Item, find_image, load_json


class _DataOnly(pickle.Unpickler):
    """Unpickles lists, dicts, strings and numbers only: a pickle that names any class or
    function (the way pickles run code) is refused instead of executed."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}: a refs file holds only plain data")


def load_refs(path: Path) -> list[dict]:
    """The refs list of refs(unc).p / refs(umd).p / refs(google).p (Python 2 pickles)."""
    try:
        refs = _DataOnly(io.BytesIO(path.read_bytes()), encoding="utf-8", errors="replace").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise UsageError(f"{path} is not a plain-data refs pickle: {e}") from None
    if not isinstance(refs, list) or (refs and not {"ref_id", "ann_id", "split", "sentences"} <= set(refs[0])):
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
    boxes = {a["id"]: a["bbox"] for a in instances["annotations"]}
    pictures = {im["id"]: im for im in instances["images"]}
    split = split or "val"
    items = []
    for ref in load_refs(refs_path):
        if ref["split"] != split:
            continue
        pic = pictures[ref["image_id"]]
        name = pic.get("file_name") or f"COCO_train2014_{ref['image_id']:012d}.jpg"
        image = find_image(images, name, f"train2014/{name}")
        for sent in ref["sentences"]:
            items.append(Item(f"{ref['ref_id']}/{sent['sent_id']}", image, {"expression": sent["sent"]}, [],
                              {"box": xywh_to_corners(*boxes[ref["ann_id"]]), "size": (pic["width"], pic["height"]),
                               "key": str(sent["sent_id"])}))
    return Benchmark(split, items)


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
