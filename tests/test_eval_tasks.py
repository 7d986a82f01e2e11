"""Every benchmark end to end with the shipped cogvlm-tiny: a miniature in the publisher's exact
file format (tests/eval_fixtures.py) is read, asked with the documented prompt, answered in
batches, recorded, scored and reported; hidden answers give the server's submission file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cogvlm import CogVLM
from cogvlm.cli import main
from cogvlm.eval.prompts import PROMPTS
from cogvlm.eval.runner import build_query, read_benchmark, run_task
from cogvlm.eval.tasks import TASKS
from cogvlm.errors import UsageError
from tests import eval_fixtures as F


@pytest.fixture(scope="module")
def vlm() -> CogVLM:
    return CogVLM.from_pretrained()


# task, file builder, split given, items, the first item's query as the documented prompt builds it
CASES = [
    ("vqav2", F.vqa_files, None, 3, "How many objects are there?"),
    ("okvqa", F.vqa_files, None, 3, "How many objects are there?"),
    ("tdiuc", F.vqa_files, None, 3, "How many objects are there?"),
    ("textvqa", F.textvqa_files, None, 2, None),
    ("vizwiz", F.vizwiz_files, None, 2, "Is there a red circle?"),
    ("gqa", F.gqa_files, None, 2, None),
    ("scienceqa", F.scienceqa_files, None, 3, "Which color is in the picture?\nA. {c}\nB. black\n"
                                              "Answer with the option's letter from the given choices directly."),
    ("coco", lambda r: F.karpathy_files(r, "coco"), None, 2, ""),
    ("flickr30k", lambda r: F.karpathy_files(r, "flickr30k"), None, 2, ""),
    ("nocaps", F.nocaps_files, None, 3, ""),
    ("refcoco", F.refcoco_files, None, 2, "Where is the {o}? answer in [[x0,y0,x1,y1]] format."),
    ("refcoco+", F.refcoco_files, "testA", 2, "Where is the {o}? answer in [[x0,y0,x1,y1]] format."),
    ("refcocog", lambda r: F.refcoco_files(r, "refs(umd).p", "test"), "test", 2,
     "Where is the {o}? answer in [[x0,y0,x1,y1]] format."),
    ("visual7w", F.visual7w_files, None, 2, None),
    ("pope", F.pope_files, None, 4, None),
]


def _fill(expected: str, task: str) -> str:
    s = F.scene(0)
    return expected.replace("{c}", s.objects[0].colour).replace("{o}", s.objects[0].name)


@pytest.mark.parametrize("task, build, split, n, first_query", CASES, ids=[c[0] for c in CASES])
def test_task_end_to_end(vlm, tmp_path, task, build, split, n, first_query):
    paths = build(tmp_path) if task != "refcoco+" else F.refcoco_files(tmp_path, split="testA")
    bench = read_benchmark(TASKS[task], paths, tmp_path / "images", split)
    assert len(bench.items) == n
    documented = PROMPTS[TASKS[task].prompt]["cogvlm"]
    if first_query is not None:
        assert build_query(documented, bench.items[0]) == _fill(first_query, task)
    out = tmp_path / "out"
    report = run_task(vlm, task, paths, tmp_path / "images", split, out=out, batch_size=4, model="cogvlm-tiny",
                      progress=False)
    run = json.loads((out / "run.json").read_text())
    assert (run["template"], run["prompt"]) == (documented.template, documented.query)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in lines) == sorted(it.id for it in bench.items)
    assert report["n"] == n and report["rows"] and all(0 <= r["score"] <= 1000 for r in report["rows"])
    assert json.loads((out / "report.json").read_text()) == report
    assert "| metric | score | published | gap |" in (out / "report.md").read_text()


def test_the_tiny_model_answers_the_miniatures_sensibly(vlm, tmp_path):
    """Not a benchmark claim: cogvlm-tiny answers its own world's questions, so a broken prompt
    or box conversion would show as a zero here."""
    vqa = run_task(vlm, "vqav2", F.vqa_files(tmp_path), tmp_path / "images", out=tmp_path / "v", progress=False)
    rec = run_task(vlm, "refcoco", F.refcoco_files(tmp_path), tmp_path / "images", out=tmp_path / "r", progress=False)
    assert vqa["rows"][0]["score"] >= 60 and rec["rows"][0]["score"] >= 50  # 3 questions, 2 expressions


@pytest.mark.parametrize("build, split", [(lambda r: F.vqa_files(r, "test-dev2015", hidden=True), None),
                                          (lambda r: F.nocaps_files(r, test=True), None)])
def test_hidden_answers_write_the_submission_file(vlm, tmp_path, build, split):
    paths = build(tmp_path)
    task = "vqav2" if "questions" in paths[0].name else "nocaps"
    result = run_task(vlm, task, paths, tmp_path / "images", split, out=tmp_path / "out", progress=False)
    submission = json.loads(Path(result["submission"]).read_text())
    assert not (tmp_path / "out" / "report.json").exists()
    if task == "vqav2":
        assert result["split"] == "test-dev2015"
        assert [sorted(x) for x in submission] == [["answer", "question_id"]] * 3
        assert [x["question_id"] for x in submission] == [1000, 1010, 1020]
    else:
        assert [sorted(x) for x in submission] == [["caption", "image_id"]] * 3


@pytest.mark.parametrize("kind, task", [("vqa", "textvqa"), ("choice", "scienceqa")])
def test_vlmevalkit_tsv(vlm, tmp_path, kind, task):
    paths = F.tsv_file(tmp_path, kind)
    bench = read_benchmark(TASKS[task], paths, None, None)
    assert [it.id for it in bench.items] == ["0", "1", "2"]
    assert bench.items[1].image == bench.items[0].image  # the row that points at row 0's image
    if kind == "vqa":
        assert bench.items[0].answers == [F.scene(0).objects[0].colour] * 10
    else:
        assert bench.items[0].fields["context"] == "Context: Look.\n" and bench.items[1].fields["context"] == ""
    report = run_task(vlm, task, paths, None, out=tmp_path / "out", progress=False)
    assert report["n"] == 3 and report["split"] == ("val" if kind == "vqa" else "test")
    assert report["rows"][0]["published"] == (70.4 if kind == "vqa" else 91.2)


def test_cli_runs_a_task_prints_the_table_and_compares(tmp_path, capsys):
    paths = F.refcoco_files(tmp_path)
    args = ["eval", "--task", "refcoco", "--annotations", *map(str, paths), "--images", str(tmp_path / "images")]
    assert main([*args, "--out", str(tmp_path / "a"), "--batch-size", "1"]) == 0
    printed = capsys.readouterr().out
    assert "RefCOCO val" in printed and "acc@0.5" in printed and "92.76" in printed
    assert main([*args, "--out", str(tmp_path / "b"), "--prompt", "Where is {expression}?"]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json")]) == 0
    assert "B - A" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--task", "vqav2"], "needs --annotations"),
    (["--task", "vqav2", "--annotations", "missing.json"], "not found"),
    (["--task", "visual7w", "--annotations", "{tsv}"], "VLMEvalKit does not ship Visual7W"),
    (["--task", "refcoco", "--annotations", "{refs}"], "refs.*instances.json"),
    (["--task", "textvqa", "--annotations", "{refs}"], "not valid JSON|not a"),
    (["--task", "vqav2", "--annotations", "{q}", "{a}", "--images", "{images}", "--prompt", "{{nope}}"], "does not have"),
    (["--task", "vqav2", "--annotations", "{q}", "{a}", "--images", "{tmp}/nowhere"], "images not found"),
    (["--task", "vqav2", "--annotations", "{q}", "{a}", "--batch-size", "0"], "--batch-size"),
    (["--compare", "{q}", "{a}"], "not a report"),
    (["{q}", "--images", "{images}"], "--images need --task"),
    ([], "give a JSONL file"),
])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    q, a = F.vqa_files(tmp_path)
    files = {"q": q, "a": a, "tsv": F.tsv_file(tmp_path, "vqa")[0], "refs": F.refcoco_files(tmp_path)[0],
             "images": tmp_path / "images", "tmp": tmp_path}
    argv = [x.format(**files) for x in argv]
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cogvlm eval: error:"), err
    assert re.search(message, err[0]), err[0]


def test_a_second_run_with_other_settings_into_the_same_folder_is_refused(vlm, tmp_path):
    paths = F.vqa_files(tmp_path, n=1)
    run_task(vlm, "vqav2", paths, tmp_path / "images", out=tmp_path / "out", progress=False)
    with pytest.raises(UsageError, match="another run .*prompt"):
        run_task(vlm, "vqav2", paths, tmp_path / "images", out=tmp_path / "out", query="{question} One word.",
                 progress=False)


def test_an_unreadable_image_is_an_empty_answer_not_a_dead_job(vlm, tmp_path, capsys):
    paths = F.vqa_files(tmp_path)
    (tmp_path / "images" / "val2014" / "COCO_val2014_000000000101.jpg").write_bytes(b"not a jpeg")
    report = run_task(vlm, "vqav2", paths, tmp_path / "images", out=tmp_path / "out", progress=False)
    preds = {json.loads(x)["id"]: json.loads(x)["prediction"] for x in (tmp_path / "out" / "predictions.jsonl").open()}
    assert report["n"] == 3 and preds["1010"] == "" and preds["1000"] != ""
    assert "item 1010: unreadable image" in capsys.readouterr().err


def test_jsonl_evaluation_still_works_from_the_cli(tmp_path, capsys):
    from cogvlm.data.synthetic import make_dataset

    data = make_dataset(tmp_path / "set", 2, seed=31, image_size=112, tasks=("vqa", "rec"))
    assert main(["eval", str(data), "--output", str(tmp_path / "r.json")]) == 0
    assert "vqa_accuracy" in capsys.readouterr().out
    assert set(json.loads((tmp_path / "r.json").read_text())["metrics"]) == {"vqa_accuracy", "rec_acc@0.5"}


def test_prompts_follow_the_model_family_and_overrides():
    from cogvlm.eval.prompts import prompt_for

    assert prompt_for("short_answer", "cogvlm-chat-v1.1").template == "vqa"
    assert prompt_for("short_answer", "cogagent-vqa").template == "chat"  # chat_old, per the authors' README
    assert prompt_for("rec", "cogagent-chat").query.startswith("Where is {expression}?")  # no CogAgent variant
    custom = prompt_for("short_answer", "cogvlm-tiny", query="{question} One word.", template="chat")
    assert (custom.template, custom.query) == ("chat", "{question} One word.")


def _pope_official(answers: list[str], labels: list[str]) -> dict[str, float]:
    """RUCAIBox/POPE evaluate.py, literally: the first sentence, commas dropped, 'No'/'not'/'no' as a
    word means no; a label is positive unless it is 'no' (VLMEvalKit's 'No' lower-cased first)."""
    preds = []
    for text in answers:
        if text.find(".") != -1:
            text = text.split(".")[0]
        words = text.replace(",", "").split(" ")
        preds.append(0 if ("No" in words or "not" in words or "no" in words) else 1)
    gold = [0 if label.lower() == "no" else 1 for label in labels]
    tp = sum(p == 1 and g == 1 for p, g in zip(preds, gold))
    tn = sum(p == 0 and g == 0 for p, g in zip(preds, gold))
    return {"accuracy": (tp + tn) / len(gold), "yes_ratio": preds.count(1) / len(preds)}


def test_vlmevalkit_pope_tsv_through_the_runner(vlm, tmp_path):
    """POPE.tsv asked and scored by the runner: one item per row (a repeated image shared), the
    scores equal POPE's rule applied to the answers the run saved, and every setting a row of its own."""
    paths = F.tsv_file(tmp_path, "yesno")
    bench = read_benchmark(TASKS["pope"], paths, None, None)
    assert [it.answers for it in bench.items] == [["Yes"], ["No"], ["Yes"], ["No"]]
    assert [it.meta["category"] for it in bench.items] == F.POPE_TSV_CATEGORIES
    assert bench.items[1].image == bench.items[0].image
    report = run_task(vlm, "pope", paths, None, out=tmp_path / "out", progress=False)
    saved = {json.loads(line)["id"]: json.loads(line)["prediction"]
             for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()}
    official = _pope_official([saved[str(i)] for i in range(4)], ["Yes", "No", "Yes", "No"])
    scores = {r["metric"]: r["score"] for r in report["rows"]}
    assert report["n"] == 4 and report["split"] == "POPE"
    assert scores["accuracy"] == round(100 * official["accuracy"], 2)
    assert scores["yes_ratio"] == round(100 * official["yes_ratio"], 2)
    assert {m.split("/")[1] for m in scores if "/" in m} == {"adversarial", "popular", "random"}
    adversarial = _pope_official([saved["0"], saved["1"]], ["Yes", "No"])["accuracy"]
    assert scores["accuracy/adversarial"] == round(100 * adversarial, 2)
