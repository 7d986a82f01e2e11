"""`cogvlm eval CLIPS.jsonl` on a video set with the tiny CogVLM2-Video in the published layout
(conftest.video_checkpoint) and real encoded clips (tests/test_caption_video.clip): every answer
equals the API's for that clip alone (`CogVLM.chat(video=path)`, greedy, the template's sampling
rule), the score is the one those answers earn, a corrupt clip is an error row while the rest are
scored, and a rerun after a kill answers only what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("av")

from cogvlm.cli.main import main  # noqa: E402
from cogvlm.data.records import is_video_set, read_video_records  # noqa: E402
from cogvlm.eval.jsonl import vqa_accuracy  # noqa: E402
from cogvlm.eval.video_jsonl import evaluate_videos  # noqa: E402

from .test_caption_video import CONTAINERS, CORRUPT, NEW_TOKENS, clip  # noqa: E402

GREEDY = {"top_k": 1, "max_new_tokens": NEW_TOKENS}
QUESTIONS = ["What happens?", "What colour is it?", "Describe the clip.", "How long is it?", "Is it moving?"]


@pytest.fixture(scope="module")
def vlm(video_checkpoint: Path):
    from cogvlm import CogVLM

    return CogVLM.from_pretrained(video_checkpoint, device="cpu")


def api_answer(vlm, video: Path, question: str, template: str) -> str:
    return vlm.chat(None, question, template=template, video=video, **GREEDY)[0]


@pytest.fixture(scope="module")
def clip_set(tmp_path_factory: pytest.TempPathFactory, vlm) -> tuple[Path, dict[str, str]]:
    """data/set.jsonl: five clips (one by absolute path, the others relative to the file), a
    corrupt clip in the middle; record 0 and 3 carry the answer the API gives, record 2 three
    annotators' answers of which two are the API's, the rest a wrong answer. Returns the file and
    the API's answer per id (chat template)."""
    root = tmp_path_factory.mktemp("videoset")
    (root / "data" / "clips").mkdir(parents=True)
    lines, expected = [], {}
    for n in range(5):
        path = root / "data" / "clips" / f"c{n}{CONTAINERS[n % 3][1]}"  # MP4, MKV and AVI clips
        path.write_bytes(clip(n))
        expected[f"q{n}"] = api_answer(vlm, path, QUESTIONS[n], "chat")
        record = {"id": f"q{n}", "video": str(path) if n == 4 else f"clips/{path.name}", "question": QUESTIONS[n]}
        if n in (0, 3):
            record["answer"] = expected[f"q{n}"]
        elif n == 2:
            record["answers"] = [expected["q2"], "no", expected["q2"]]
        else:
            record["answer"] = "a wrong answer"
        lines.append(json.dumps(record))
        if n == 2:
            (root / "data" / "clips" / "bad.mp4").write_bytes(CORRUPT)
            lines.append(json.dumps({"id": "bad", "video": "clips/bad.mp4", "question": "Why?", "answer": "x"}))
    data = root / "data" / "set.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return data, expected


def expected_accuracy(data: Path, answers: dict[str, str]) -> float:
    records, _ = read_video_records(data)
    scores = [vqa_accuracy(answers[r.id], r.answers) for r in records if r.id != "bad"]
    return sum(scores) / len(scores)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_answers_equal_the_api_one_clip_at_a_time(vlm, clip_set, tmp_path):
    data, expected = clip_set
    assert is_video_set(data)
    report = evaluate_videos(vlm, data, tmp_path / "run", template="chat", batch_size=3, sampling=GREEDY,
                             decoders=2, progress=False)
    got = {r["id"]: r for r in rows(tmp_path / "run")}
    assert {k: v["prediction"] for k, v in got.items() if k != "bad"} == expected
    assert "bad" in got and "corrupt" in got["bad"]["error"] and "prediction" not in got["bad"]
    assert report["counts"] == {"accuracy": 5}
    assert report["metrics"]["accuracy"] == pytest.approx(expected_accuracy(data, expected), abs=1e-12)
    assert report["metrics"]["accuracy"] == pytest.approx((1 + 0 + 4 / 9 + 1 + 0) / 5, abs=1e-12)
    # q2, VQA's rule over 3 annotators (2 agree): the mean over leave-one-out of min(1, matches / 3) = 4/9
    assert [e["id"] for e in report["errors"]] == ["bad"]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["metrics"] == report["metrics"]


def test_base_template_samples_by_the_base_rule(vlm, clip_set, tmp_path):
    data, _ = clip_set
    evaluate_videos(vlm, data, tmp_path / "base", template="base", batch_size=4, sampling=GREEDY, limit=3,
                    progress=False)
    records = read_video_records(data)[0][:3]
    got = {r["id"]: r.get("prediction") for r in rows(tmp_path / "base")}
    assert got == {r.id: None if r.id == "bad" else api_answer(vlm, r.video, r.question, "base") for r in records}


def test_a_killed_run_resumes_with_only_the_missing_answers(vlm, clip_set, tmp_path):
    data, expected = clip_set
    out = tmp_path / "run"
    first = evaluate_videos(vlm, data, out, template="chat", batch_size=2, sampling=GREEDY, progress=False)
    journal = out / "predictions.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:3]) + lines[3][:10])  # killed mid-write of the fourth row
    again = evaluate_videos(vlm, data, out, template="chat", batch_size=2, sampling=GREEDY, progress=False)
    ids = [r["id"] for r in rows(out)]
    assert sorted(ids) == sorted([*expected, "bad"]) and len(ids) == len(set(ids))  # each once
    assert again["metrics"] == first["metrics"] and again["examples"] == first["examples"]
    before = journal.read_bytes()
    evaluate_videos(vlm, data, out, template="chat", batch_size=2, sampling=GREEDY, progress=False)
    assert journal.read_bytes() == before  # nothing left to answer


def test_cli_video_set(vlm, clip_set, video_checkpoint, tmp_path, capsys):
    data, expected = clip_set
    flags = ["--model", str(video_checkpoint), "--template", "chat", "--top_k", "1", "--max_new_tokens", str(NEW_TOKENS)]
    assert main(["eval", str(data), *flags, "--out", str(tmp_path / "cli"), "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "error: bad" in out and "corrupt" in out
    assert {r["id"]: r.get("prediction") for r in rows(tmp_path / "cli")} == {**expected, "bad": None}
    # the same --out with another template would mix two runs' answers: one line, exit 2
    assert main(["eval", str(data), *flags[:2], "--template", "base", "--out", str(tmp_path / "cli")]) == 2
    assert "holds predictions of another run" in capsys.readouterr().err
    assert main(["eval", str(data), *flags, "--output", str(tmp_path / "x.json")]) == 2
    assert "do not apply to a video set" in capsys.readouterr().err


def test_bad_video_records_are_skipped_with_their_line(tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text("\n".join([
        json.dumps({"id": "a", "video": "a.mp4", "question": "q", "answer": "x"}),
        json.dumps({"id": "a", "video": "b.mp4", "question": "q", "answer": "x"}),
        json.dumps({"id": "c", "video": "c.mp4", "question": "q"}),
        json.dumps({"id": "d", "video": "", "question": "q", "answer": "x"}),
        json.dumps({"id": "e", "video": "e.mp4", "question": "q", "answers": []}),
        "not json",
    ]) + "\n")
    records, errors = read_video_records(data)
    assert [r.id for r in records] == ["a"] and records[0].video == tmp_path / "a.mp4"
    assert [(e.line, e.message.split(" ")[0]) for e in errors] == [(2, "id"), (3, "missing"), (4, "'video'"),
                                                                 (5, "'answer'"), (6, "invalid")]


def test_an_image_model_refuses_a_video_set(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"id": "a", "video": "a.mp4", "question": "q", "answer": "x"}) + "\n")
    assert main(["eval", str(data), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "takes images, not videos" in err and err.count("\n") == 1


@pytest.mark.slow
def test_torchrun_shares_give_the_one_process_report(vlm, clip_set, video_checkpoint, tmp_path):
    """torchrun --nproc_per_node 2: each process answers every other record with its own model;
    rank 0 scores all of them, as one process does."""
    import subprocess
    import sys

    data, expected = clip_set
    one = evaluate_videos(vlm, data, tmp_path / "one", template="chat", sampling=GREEDY, progress=False)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cogvlm", "eval", str(data), "--model", str(video_checkpoint), "--template",
                          "chat", "--top_k", "1", "--max_new_tokens", str(NEW_TOKENS), "--out", str(tmp_path / "two"),
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two" / "predictions.rank1.jsonl").exists()
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert report["metrics"] == one["metrics"] and report["examples"] == one["examples"]
    assert [e["id"] for e in report["errors"]] == ["bad"]
