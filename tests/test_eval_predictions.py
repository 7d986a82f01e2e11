"""`cogvlm eval --task T --predictions ANSWERS.jsonl`: any model's existing answers scored on every
task's publisher-format miniature, without loading a model or reading an image; a wrong id, a
missing answer and a duplicate are counted and reported."""

from __future__ import annotations

import json
import shutil

import pytest

from cogvlm.cli import main
from cogvlm.eval.runner import read_benchmark
from cogvlm.eval.tasks import TASKS
from cogvlm.grounding import format_boxes, from_pixels
from tests import eval_fixtures as F

BUILDERS = {
    "vqav2": F.vqa_files, "okvqa": F.vqa_files, "tdiuc": F.vqa_files, "textvqa": F.textvqa_files,
    "vizwiz": F.vizwiz_files, "gqa": F.gqa_files, "scienceqa": F.scienceqa_files,
    "coco": lambda r: F.karpathy_files(r, "coco"), "flickr30k": lambda r: F.karpathy_files(r, "flickr30k"),
    "nocaps": F.nocaps_files, "refcoco": F.refcoco_files, "refcoco+": F.refcoco_files,
    "refcocog": lambda r: F.refcoco_files(r, "refs(umd).p"), "visual7w": F.visual7w_files, "pope": F.pope_files,
}
CAPTIONS = {"coco", "flickr30k", "nocaps"}


def _right_answer(task: str, item) -> str:
    """What a perfect model would answer, in the task's answer form."""
    if task in ("refcoco", "refcoco+", "refcocog"):
        return "here " + format_boxes([from_pixels(*item.meta["box"], *item.meta["size"])])
    if task == "visual7w":
        return format_boxes([from_pixels(*item.meta["candidates"][item.meta["answer"]], *item.meta["size"])])
    return item.answers[0]


def _row(task: str, key: str, answer: str) -> dict:
    return {"image_id": key, "caption": answer} if task in CAPTIONS else {"question_id": key, "answer": answer}


@pytest.fixture
def no_model(monkeypatch):
    """Scoring existing answers must never load a model."""
    import cogvlm.cli.eval as cli

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "load_model", refuse)


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_every_task_scores_existing_answers_without_model_or_images(tmp_path, no_model, capsys, task):
    paths = BUILDERS[task](tmp_path)
    items = read_benchmark(TASKS[task], paths, tmp_path / "images", None).items
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(_row(task, it.key, _right_answer(task, it))) + "\n" for it in items))
    images = []
    if task == "visual7w":  # its boxes scale with each image's size, read from the image files
        images = ["--images", str(tmp_path / "images")]
    else:
        shutil.rmtree(tmp_path / "images")  # no image is read
    out = tmp_path / "out"
    assert main(["eval", "--task", task, "--annotations", *map(str, paths), "--predictions", str(answers),
                 "--out", str(out), *images]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == len(items) and report["predictions_file"] == str(answers)
    assert report["scorer"]["name"] == TASKS[task].scorers[0].name and report["scorer"]["official"]
    assert f"scorer: {report['scorer']['name']}" in printed and f"predictions: {answers}" in printed
    assert all(v["count"] == 0 for v in report["check"].values())
    first = report["rows"][0]
    if task not in CAPTIONS:  # a perfect answer scores 100 under the official rule
        assert first["score"] == 100.0, report["rows"]
    else:
        assert first["metric"] == "cider" and first["score"] > 0


def test_wrong_missing_and_duplicate_ids_are_counted_and_reported(tmp_path, no_model, capsys):
    paths = F.vqa_files(tmp_path, n=3)  # question ids 1000, 1010, 1020, every answer "k"
    items = read_benchmark(TASKS["vqav2"], paths, tmp_path / "images", None).items
    rows = [{"question_id": 1000, "answer": items[0].answers[0]}, {"question_id": 1000, "answer": "wrong"},
            {"question_id": 999999, "answer": "x"}, {"question_id": 1010, "answer": items[1].answers[0]}]
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--task", "vqav2", "--annotations", *map(str, paths), "--predictions", str(answers),
                 "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["check"] == {"unknown": {"count": 1, "examples": ["999999"]},
                               "missing": {"count": 1, "examples": ["1020"]},
                               "duplicate": {"count": 1, "examples": ["1000"]}}
    assert report["rows"][0]["score"] == pytest.approx(200 / 3, abs=0.01)  # first answer kept; missing one wrong
    assert "1 ids not in the benchmark" in printed and "1 items without an answer" in printed
    assert "1 ids answered more than once, the first answer scored" in printed


def test_scorer_choice_and_lenient_label(tmp_path, no_model, capsys):
    paths = F.gqa_files(tmp_path)
    items = read_benchmark(TASKS["gqa"], paths, tmp_path / "images", None).items
    answers = tmp_path / "answers.json"  # a JSON list, as the submission files are; GQA's own field names
    answers.write_text(json.dumps([{"questionId": it.key, "prediction": f"The {it.answers[0].upper()}."} for it in items]))
    args = ["eval", "--task", "gqa", "--annotations", *map(str, paths), "--predictions", str(answers)]
    assert main(args) == 0
    official = capsys.readouterr().out
    assert main([*args, "--scorer", "lenient"]) == 0
    lenient = capsys.readouterr().out
    assert "accuracy                       0.00" in official and "scorer: gqa:" in official
    assert "accuracy                     100.00" in lenient and "(NOT the official scorer)" in lenient


def test_gqa_all_questions_file_is_scored_on_balanced_questions(tmp_path):
    path = F.gqa_files(tmp_path)[0]
    data = json.loads(path.read_text())
    data["x9"] = dict(next(iter(data.values())), isBalanced=False)
    path.write_text(json.dumps(data))
    bench = read_benchmark(TASKS["gqa"], [path], tmp_path / "images", None)
    assert [it.id for it in bench.items] == ["20130", "20131"]
    assert "1 of 3 questions are not isBalanced" in bench.notes[0]


@pytest.mark.parametrize("argv, message", [
    (["--scorer", "llava-sqa"], "--scorer llava-sqa does not apply to --task vqav2"),
    (["--predictions", "{tmp}/none.jsonl"], "predictions file not found"),
    (["--predictions", "{bad}"], "line 1 is not JSON"),
    (["--predictions", "{noid}"], "record 1 has no id"),
    (["--predictions", "{bad}", "--prompt", "{{question}}"], "--prompt cannot apply to --predictions"),
])
def test_predictions_mistakes_are_one_line_and_exit_2(tmp_path, capsys, no_model, argv, message):
    q, a = F.vqa_files(tmp_path)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    (tmp_path / "noid.jsonl").write_text('{"answer": "2"}\n')
    files = {"tmp": tmp_path, "bad": tmp_path / "bad.jsonl", "noid": tmp_path / "noid.jsonl"}
    argv = [x.format(**files) for x in argv]
    if "--predictions" not in argv:
        argv += ["--predictions", str(tmp_path / "bad.jsonl")]
    assert main(["eval", "--task", "vqav2", "--annotations", str(q), str(a), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_visual7w_answers_without_images_are_refused_not_misscaled(tmp_path, no_model, capsys):
    paths = F.visual7w_files(tmp_path)
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"question_id": 7000, "answer": "[[0,0,999,999]]"}\n')
    assert main(["eval", "--task", "visual7w", "--annotations", *map(str, paths), "--predictions", str(answers)]) == 2
    assert "give --images (only their sizes are read)" in capsys.readouterr().err


def test_vlmevalkit_pope_tsv_scored_from_answers(tmp_path, no_model, capsys):
    """VLMEvalKit's POPE.tsv (labels Yes/No, a row whose category names all three settings) through
    `--predictions`, keyed by the TSV's index. By POPE's evaluate.py: row 0 yes/Yes (TP), row 1
    no/No (TN), row 2 "There is no dog." -> no / Yes (FN), row 3 yes / No (FP)."""
    tsv = F.tsv_file(tmp_path, "yesno")[0]
    answers = tmp_path / "answers.jsonl"
    rows = [("0", "Yes, there is a shape."), ("1", "No."), ("2", "There is no dog."), ("3", "yes")]
    answers.write_text("".join(json.dumps({"question_id": k, "answer": a}) + "\n" for k, a in rows))
    out = tmp_path / "out"
    assert main(["eval", "--task", "pope", "--annotations", str(tsv), "--predictions", str(answers),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    scores = {r["metric"]: r["score"] for r in report["rows"]}
    assert report["split"] == "POPE" and report["n"] == 4 and report["scorer"]["name"] == "pope"
    assert (scores["accuracy"], scores["precision"], scores["recall"], scores["f1"], scores["yes_ratio"]) == (
        50.0, 50.0, 50.0, 50.0, 50.0)  # TP = TN = FP = FN = 1
    assert (scores["accuracy/adversarial"], scores["f1/adversarial"]) == (100.0, 100.0)  # rows 0, 1
    assert (scores["accuracy/popular"], scores["f1/popular"]) == (50.0, 66.67)  # rows 0, 2: P 1, R 1/2
    assert (scores["accuracy/random"], scores["f1/random"]) == (50.0, 66.67)  # rows 0, 3: P 1/2, R 1
    adversarial = next(r for r in report["rows"] if r["metric"] == "accuracy/adversarial")
    assert (adversarial["published"], adversarial["gap"]) == (87.6, 12.4)  # the setting's published number
    assert "accuracy/adversarial" in printed and all(v["count"] == 0 for v in report["check"].values())
