"""Miniature benchmarks in their publishers' exact file formats, drawn from synthetic scenes
(cogvlm-tiny's world, 112 px) so the shipped model answers them meaningfully."""

from __future__ import annotations

import base64
import io
import json
import pickle
from pathlib import Path

from cogvlm.data.synthetic import make_scene

SIZE = 112


def scene(i: int):
    return make_scene(4242 * 1_000_003 + i, SIZE)


def save(image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG" if path.suffix == ".png" else "JPEG", quality=95)
    return path


def dump(obj, path: Path) -> Path:
    path.write_text(json.dumps(obj))
    return path


def vqa_files(root: Path, subtype: str = "val2014", hidden: bool = False, n: int = 3,
              types=("how many", "what color", "is there")) -> list[Path]:
    """v2_OpenEnded_mscoco_<subtype>_questions.json (+ v2_mscoco_<subtype>_annotations.json)."""
    folder = "test2015" if subtype == "test-dev2015" else subtype
    questions, annotations = [], []
    for i in range(n):
        s = scene(i)
        image_id = 100 + i
        save(s.image, root / "images" / folder / f"COCO_{folder}_{image_id:012d}.jpg")
        question_id = image_id * 10
        questions.append({"image_id": image_id, "question": "How many objects are there?", "question_id": question_id})
        answer = str(len(s.objects))
        annotations.append({"question_id": question_id, "image_id": image_id, "question_type": types[i % len(types)],
                            "answer_type": "number", "multiple_choice_answer": answer,
                            "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                        for k in range(10)]})
    paths = [dump({"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "license": {},
                   "data_subtype": subtype, "questions": questions},
                  root / f"v2_OpenEnded_mscoco_{subtype}_questions.json")]
    if not hidden:
        paths.append(dump({"info": {}, "license": {}, "data_subtype": subtype, "annotations": annotations},
                          root / f"v2_mscoco_{subtype}_annotations.json"))
    return paths


def textvqa_files(root: Path) -> list[Path]:
    data = []
    for i in range(2):
        s = scene(i)
        save(s.image, root / "images" / "train_images" / f"a{i}b.jpg")
        data.append({"question": f"What color is the {s.objects[0].shape}?", "image_id": f"a{i}b",
                     "image_classes": [], "flickr_original_url": "", "flickr_300k_url": "", "image_width": SIZE,
                     "image_height": SIZE, "answers": [s.objects[0].colour] * 10, "question_tokens": [],
                     "question_id": 34600 + i, "set_name": "val"})
    return [dump({"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1", "data": data},
                 root / "TextVQA_0.5.1_val.json")]


def vizwiz_files(root: Path) -> list[Path]:
    rows = []
    for i in range(2):
        s = scene(i)
        name = f"VizWiz_val_{i:08d}.jpg"
        save(s.image, root / "images" / "val" / name)
        rows.append({"image": name, "question": "Is there a red circle?", "answerable": 1, "answer_type": "yes/no",
                     "answers": [{"answer": "yes", "answer_confidence": "yes"}] * 10})
    return [dump(rows, root / "val.json")]


def gqa_files(root: Path) -> list[Path]:
    data = {}
    for i in range(2):
        s = scene(i)
        save(s.image, root / "images" / "images" / f"n16{i}.jpg")
        o = s.objects[0]
        data[f"2013{i}"] = {"semantic": [], "entailed": [], "equivalent": [], "question": f"What shape is the {o.colour} object?",
                            "imageId": f"n16{i}", "isBalanced": True, "groups": {"global": None, "local": ""},
                            "answer": o.shape, "semanticStr": "", "annotations": {}, "fullAnswer": f"It is a {o.shape}.",
                            "types": {"structural": "query", "semantic": "attr", "detailed": "shape"}}
    return [dump(data, root / "testdev_balanced_questions.json")]


def scienceqa_files(root: Path) -> list[Path]:
    problems = {}
    for i in range(3):
        s = scene(i)
        problems[str(10 + i)] = {"question": "Which color is in the picture?", "choices": [s.objects[0].colour, "black"],
                                 "answer": 0, "hint": "Look at the shapes." if i else "", "image": "image.png",
                                 "task": "closed choice", "grade": "grade2", "subject": "natural science",
                                 "topic": "colors", "category": "", "skill": "", "lecture": "", "solution": "",
                                 "split": "test"}
        save(s.image, root / "images" / "test" / str(10 + i) / "image.png")
    problems["99"] = dict(problems["10"], image=None)  # no image: not in the image subset
    problems["98"] = dict(problems["10"], split="val")
    return [dump(problems, root / "problems.json")]


def karpathy_files(root: Path, dataset: str) -> list[Path]:
    from cogvlm.data.synthetic import caption

    images = []
    for i in range(3):
        s = scene(i)
        if dataset == "coco":
            name, extra = f"COCO_val2014_{200 + i:012d}.jpg", {"filepath": "val2014", "cocoid": 200 + i}
            save(s.image, root / "images" / "val2014" / name)
        else:
            name, extra = f"{1000092795 + i}.jpg", {}
            save(s.image, root / "images" / name)
        images.append({"sentids": [i], "imgid": i, "filename": name, "split": "test" if i < 2 else "train",
                       "sentences": [{"tokens": [], "raw": caption(s), "imgid": i, "sentid": i},
                                     {"tokens": [], "raw": "Some shapes on a plain background.", "imgid": i, "sentid": 9}],
                       **extra})
    return [dump({"images": images, "dataset": dataset}, root / f"dataset_{dataset}.json")]


def nocaps_files(root: Path, test: bool = False) -> list[Path]:
    from cogvlm.data.synthetic import caption

    images, annotations = [], []
    for i, domain in enumerate(("in-domain", "near-domain", "out-domain")):
        s = scene(i)
        name = f"00{i}3ea2087020901.jpg"
        save(s.image, root / "images" / name)
        images.append({"id": i, "open_images_id": name[:-4], "height": SIZE, "width": SIZE, "coco_url": "",
                       "file_name": name, "domain": domain})
        annotations += [{"image_id": i, "id": 10 * i + k, "caption": c}
                        for k, c in enumerate([caption(s), "shapes on a background."])]
    if test:
        return [dump({"licenses": [], "info": {}, "images": images}, root / "nocaps_test_image_info.json")]
    return [dump({"licenses": [], "info": {}, "images": images, "annotations": annotations},
                 root / "nocaps_val_4500_captions.json")]


def refcoco_files(root: Path, refs_name: str = "refs(unc).p", split: str = "val") -> list[Path]:
    refs, anns, pics = [], [], []
    for i in range(2):
        s = scene(i)
        image_id = 300 + i
        name = f"COCO_train2014_{image_id:012d}.jpg"
        save(s.image, root / "images" / "train2014" / name)
        pics.append({"id": image_id, "file_name": name, "height": SIZE, "width": SIZE})
        for k, o in enumerate(s.objects[:2]):
            ann_id = image_id * 10 + k
            x0, y0, x1, y1 = o.box_px
            anns.append({"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "segmentation": []})
            refs.append({"image_id": image_id, "split": split if k == 0 else "train",
                         "sentences": [{"tokens": ["the", o.colour, o.shape], "raw": f"The {o.name}",
                                        "sent_id": ann_id * 2, "sent": f"the {o.name}"}],
                         "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "category_id": 1,
                         "ann_id": ann_id, "sent_ids": [ann_id * 2], "ref_id": ann_id})
    (root / refs_name).write_bytes(pickle.dumps(refs, protocol=2))
    return [root / refs_name, dump({"images": pics, "annotations": anns, "categories": [{"id": 1, "name": "shape"}]},
                                   root / "instances.json")]


def visual7w_files(root: Path) -> list[Path]:
    images, boxes = [], []
    for i in range(2):
        s = make_scene(777 * 1_000_003 + i, SIZE, min_objects=4)
        name = f"v7w_{50 + i}.jpg"
        save(s.image, root / "images" / "images" / name)
        ids = []
        for k, o in enumerate(s.objects):
            x0, y0, x1, y1 = o.box_px
            boxes.append({"box_id": 1000 * i + k, "x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "name": o.shape})
            ids.append(1000 * i + k)
        target = s.objects[0]
        images.append({"image_id": 50 + i, "filename": name, "split": "test",
                       "qa_pairs": [{"qa_id": 7000 + i, "image_id": 50 + i, "type": "which",
                                     "question": f"Which one is the {target.name}?", "answer": ids[0],
                                     "multiple_choices": ids[1:4]}]})
    return [dump({"images": images, "boxes": boxes}, root / "dataset_v7w_pointing.json")]


def pope_files(root: Path) -> list[Path]:
    lines = []
    for i in range(2):
        s = scene(i)
        name = f"COCO_val2014_{400 + i:012d}.jpg"
        save(s.image, root / "images" / name)
        o = s.objects[0]
        lines.append({"question_id": 2 * i + 1, "image": name, "text": f"Is there a {o.name} in the image?", "label": "yes"})
        lines.append({"question_id": 2 * i + 2, "image": name, "text": "Is there a black hexagon in the image?",
                      "label": "no"})
    path = root / "coco_pope_adversarial.json"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return [path]


def _b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def tsv_file(root: Path, kind: str) -> list[Path]:
    """VLMEvalKit's layout: index, image (base64; a repeated image holds its first row's index), ...
    `kind` "vqa" (TextVQA_VAL), "choice" (ScienceQA_TEST) or "yesno" (POPE: Yes/No answers, one
    row's category naming all three settings, comma-joined, as VLMEvalKit's file has them)."""
    if kind == "yesno":
        return [_pope_tsv(root)]
    rows = []
    for i in range(3):
        s = scene(i // 2)
        image = _b64(s.image) if i % 2 == 0 else str(i - 1)
        o = s.objects[0]
        if kind == "vqa":
            rows.append({"index": str(i), "image": image, "question": f"What color is the {o.shape}?",
                         "answer": str([o.colour] * 10)})
        else:
            rows.append({"index": str(i), "image": image, "question": "Which color is in the picture?",
                         "hint": "nan" if i else "Look.", "A": o.colour, "B": "black", "answer": "A",
                         "category": "colors"})
    return [_write_tsv(root / ("TextVQA_VAL.tsv" if kind == "vqa" else "ScienceQA_TEST.tsv"), rows)]


POPE_TSV_CATEGORIES = ["adversarial,popular,random", "adversarial", "popular", "random"]


def _pope_tsv(root: Path) -> Path:
    rows = []
    for i, category in enumerate(POPE_TSV_CATEGORIES):
        s = scene(i // 2)
        image = _b64(s.image) if i % 2 == 0 else str(i - 1)
        there = i % 2 == 0
        thing = s.objects[0].name if there else "black hexagon"
        rows.append({"index": str(i), "image": image, "question": f"Is there a {thing} in the image?",
                     "answer": "Yes" if there else "No", "category": category})
    return _write_tsv(root / "POPE.tsv", rows)


def _write_tsv(path: Path, rows: list[dict]) -> Path:
    cols = list(rows[0])
    path.write_text("\t".join(cols) + "\n" + "".join("\t".join(r[c] for c in cols) + "\n" for r in rows))
    return path
