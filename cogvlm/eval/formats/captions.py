"""Caption files: Karpathy's split JSON (COCO, Flickr30k) and COCO-format captions (NoCaps)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...errors import UsageError
from . import Benchmark, Item, find_image, load_json, one_file


def read_karpathy(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """dataset_coco.json / dataset_flickr30k.json: {images: [{filepath?, filename, split,
    sentences: [{raw}], cocoid | imgid}]}; the Karpathy test split by default."""
    path = one_file(paths, "Karpathy's dataset_*.json")
    data = load_json(path)
    if not isinstance(data, dict) or "images" not in data or (data["images"] and "sentences" not in data["images"][0]):
        raise UsageError(f"{path} is not a Karpathy split file (dataset_coco.json / dataset_flickr30k.json)")
    split = split or "test"
    items = []
    for im in data["images"]:
        if im["split"] != split:
            continue
        name = im["filename"]
        image = find_image(images, f"{im['filepath']}/{name}" if im.get("filepath") else name, name, f"images/{name}")
        key = im.get("cocoid", im.get("imgid", name))
        items.append(Item(str(key), image, {}, [s["raw"] for s in im["sentences"]], {"image_id": key}))
    return Benchmark(split, items)


def read_coco_captions(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """COCO-format caption files, e.g. NoCaps' nocaps_val_4500_captions.json ({images, annotations});
    nocaps_test_image_info.json has no annotations: a submission for the EvalAI server."""
    path = one_file(paths, "a COCO-format captions JSON")
    data = load_json(path)
    if not isinstance(data, dict) or "images" not in data:
        raise UsageError(f"{path} is not a COCO-format captions file ({{images, annotations}})")
    refs: dict[int, list[str]] = {}
    for a in data.get("annotations", []):
        refs.setdefault(a["image_id"], []).append(a["caption"])
    kind = split or ("test" if "test" in path.name else "val")
    items = [Item(str(im["id"]), find_image(images, im["file_name"], f"{kind}/{im['file_name']}"), {},
                  refs.get(im["id"]) if "annotations" in data else None,
                  {"image_id": im["id"], "domain": im.get("domain")}) for im in data["images"]]
    return Benchmark(kind, items)
