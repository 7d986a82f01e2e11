"""Open-ended VQA files: VQAv2 / OK-VQA / TDIUC (questions + annotations JSON), TextVQA, VizWiz, GQA."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ...errors import UsageError
from . import Benchmark, Item, find_image, load_json, one_file, require


def coco_image(images: Path | None, subtype: str, image_id: int) -> Path:
    """COCO_val2014_000000000042.jpg, directly in --images or in its val2014/ folder. VQAv2's
    test-dev questions (data_subtype test-dev2015) are about test2015 images."""
    folder = "test2015" if subtype == "test-dev2015" else subtype
    name = f"COCO_{folder}_{image_id:012d}.jpg"
    return find_image(images, name, f"{folder}/{name}")


def read_vqa(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """VQAv2 (v2_OpenEnded_mscoco_*_questions.json [+ v2_mscoco_*_annotations.json]); OK-VQA and
    TDIUC ship the same two files. Without annotations (test, test-dev) the answers are hidden."""
    questions = annotations = None
    for path in paths:
        data = load_json(path)
        if isinstance(data, dict) and "questions" in data:
            questions = (path, data)
        elif isinstance(data, dict) and "annotations" in data:
            annotations = {a["question_id"]: a for a in data["annotations"]}
        else:
            raise UsageError(f"{path} has neither 'questions' nor 'annotations': not a VQA-format file")
    if questions is None:
        raise UsageError("--annotations needs the questions file (…_questions.json), and the annotations "
                         "file (…_annotations.json) unless the answers are hidden")
    path, data = questions
    subtype = data.get("data_subtype") or split or "val2014"
    items = []
    for q in data["questions"]:
        ann = annotations.get(q["question_id"]) if annotations is not None else None
        if annotations is not None and ann is None:
            raise UsageError(f"question {q['question_id']} has no annotation: the two files do not belong together")
        meta = {"question_id": q["question_id"]}
        if ann:
            meta.update(question_type=ann.get("question_type"), answer_type=ann.get("answer_type"))
        items.append(Item(str(q["question_id"]), coco_image(images, subtype, q["image_id"]),
                          {"question": q["question"]}, [a["answer"] for a in ann["answers"]] if ann else None, meta))
    return Benchmark(subtype, items)


def read_textvqa(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """TextVQA_0.5.1_{val,test}.json; val images are in train_images/, test ones in test_images/."""
    path = one_file(paths, "TextVQA_0.5.1_*.json")
    data = load_json(path)
    require(data, ("data",), path, "a TextVQA file")
    kind = data.get("dataset_type") or split or "val"
    items = []
    for q in data["data"]:
        name = f"{q['image_id']}.jpg"
        image = find_image(images, name, f"train_images/{name}", f"test_images/{name}", f"train_val_images/train_images/{name}")
        items.append(Item(str(q["question_id"]), image, {"question": q["question"]}, q.get("answers"),
                          {"question_id": q["question_id"]}))
    return Benchmark(kind, items)


def read_vizwiz(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """VizWiz-VQA Annotations/{val,test}.json: a list of {image, question, answers[, answerable]}."""
    path = one_file(paths, "VizWiz Annotations/val.json or test.json")
    data = load_json(path)
    if not isinstance(data, list) or (data and not {"image", "question"} <= set(data[0])):
        raise UsageError(f"{path} is not a VizWiz annotation list of {{image, question, answers}}")
    kind = split or (data[0]["image"].split("_")[1] if data and data[0]["image"].count("_") >= 2 else "val")
    items = [Item(q["image"], find_image(images, q["image"], f"{kind}/{q['image']}"), {"question": q["question"]},
                  [a["answer"] for a in q["answers"]] if q.get("answers") else None,
                  {"answer_type": q.get("answer_type")}) for q in data]
    return Benchmark(kind, items)


def read_gqa(paths: Sequence[Path], images: Path | None, split: str | None) -> Benchmark:
    """GQA's {split}_balanced_questions.json or {split}_all_questions.json: {question_id: {imageId,
    question, answer, isBalanced, ...}}. GQA's eval.py scores only isBalanced questions, so an
    all-questions file with answers is asked and scored on those; the submission questions file
    has no answers, and every question of it goes to the server."""
    path = one_file(paths, "GQA *_questions.json")
    data = load_json(path)
    if not isinstance(data, dict) or (data and "imageId" not in next(iter(data.values()))):
        raise UsageError(f"{path} is not a GQA questions file ({{id: {{imageId, question, answer}}}})")
    kind = split or path.name.split("_")[0]
    notes = []
    if any("answer" in q for q in data.values()):
        balanced = {qid: q for qid, q in data.items() if q.get("isBalanced", True)}
        if len(balanced) < len(data):
            notes.append(f"{len(data) - len(balanced)} of {len(data)} questions are not isBalanced: "
                         "not asked, not scored (GQA's eval.py scores isBalanced questions only)")
        data = balanced
    items = [Item(qid, find_image(images, f"{q['imageId']}.jpg", f"images/{q['imageId']}.jpg"),
                  {"question": q["question"]}, [q["answer"]] if "answer" in q else None, {"types": q.get("types")})
             for qid, q in data.items()]
    return Benchmark(kind, items, notes)
