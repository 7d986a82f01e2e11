"""`cogvlm caption`: real subprocesses on generated images, a real SIGKILL midway and a rerun,
torchrun with two processes, and the journal's partial-line handling. Captions must equal the
API's (`CogVLM.generate`, base template, empty query, greedy) for the same images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogvlm.caption import RecordFile, caption_images
from cogvlm.cli import main
from cogvlm.data.synthetic import make_scene

ROOT = Path(__file__).resolve().parent.parent
# One thread per process: the tiny model gains nothing from more, and on a busy machine they fight.
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
NEW_TOKENS = 48
GREEDY = {"top_k": 1, "max_new_tokens": NEW_TOKENS}
GREEDY_FLAGS = ["--top_k", "1", "--max_new_tokens", str(NEW_TOKENS)]
FAILURES = ("corrupt.png", "truncated.jpg")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 scenes in nested folders (PNG and JPEG), 2 unreadable files and a non-image."""
    root = tmp_path_factory.mktemp("images")
    for i in range(30):
        folder = root / ("a" if i < 12 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        make_scene(i, 48).image.save(folder / f"scene{i:02d}.{'png' if i % 2 else 'jpg'}")
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (root / "b" / "truncated.jpg").write_bytes((root / "a" / "scene00.jpg").read_bytes()[:300])
    (root / "notes.md").write_text("not an image")
    return root


def images_in(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("scene*") if p.suffix != ".txt")


def captions_in(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*.txt")}


def cogvlm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogvlm", *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def full_run(talkative: Path, dataset: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One uninterrupted run writing .txt files into a copy of the data set."""
    root = tmp_path_factory.mktemp("full") / "data"
    shutil.copytree(dataset, root)
    return root, cogvlm("caption", ".", "--model", str(talkative), *GREEDY_FLAGS, "--batch-size", "4", cwd=root)


def test_captions_every_image_and_reports_unreadable_ones(full_run, talkative_vlm):
    root, run = full_run
    assert run.returncode == 0, run.stderr
    assert "30 captioned, 0 skipped (already done), 2 failed (of 32 images)" in run.stdout
    for name in FAILURES:
        assert f"skipped: {name}" in run.stderr.replace("a/", "").replace("b/", "")
    assert "Traceback" not in run.stderr
    captions = captions_in(root)
    assert sorted(captions) == sorted(str(p.relative_to(root).with_suffix(".txt")) for p in images_in(root))
    want = talkative_vlm.generate([(p, "", None) for p in images_in(root)], template="base", **GREEDY)
    assert [captions[str(p.relative_to(root).with_suffix(".txt"))] for p in images_in(root)] == [w + "\n" for w in want]
    assert len(set(want)) > 20, "the captions should differ from image to image"


def test_killed_run_resumes_without_loss_or_repeats(full_run, talkative, dataset, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    args = ["caption", ".", "--model", str(talkative), *GREEDY_FLAGS, "--batch-size", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "cogvlm", *args], cwd=root, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(captions_in(root)) < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = len(captions_in(root))
    assert 4 <= before < 30, f"the kill should land midway, not after {before} captions"

    rerun = cogvlm(*args, cwd=root)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{30 - before} captioned, {before} skipped (already done), 2 failed" in rerun.stdout
    assert captions_in(root) == captions_in(full_run[0])
    originals = {str(p.relative_to(dataset)) for p in dataset.rglob("*") if p.is_file()}
    left = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".txt"}
    assert left == originals, "no temporary or partial files may remain"


def test_two_processes_under_torchrun_equal_one(talkative, dataset, tmp_path):
    flags = ["caption", str(dataset), "--model", str(talkative), *GREEDY_FLAGS, "--batch-size", "4"]
    one = cogvlm(*flags, "--output", str(tmp_path / "one.jsonl"), cwd=ROOT)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "cogvlm", *flags, "--output", str(tmp_path / "two.jsonl")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert "30 captioned, 0 skipped (already done), 2 failed (of 32 images)" in two.stdout
    lines = [set((tmp_path / f"{n}.jsonl").read_text().splitlines()) for n in ("one", "two")]
    assert lines[0] == lines[1] and len(lines[0]) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]  # journals merged, removed


def test_journal_ignores_a_partial_last_line_and_csv_resumes(talkative_vlm, dataset, tmp_path):
    images = images_in(dataset)[:5]
    out = tmp_path / "captions.csv"
    sink, greedy = RecordFile(out, rank=0), talkative_vlm.sampling(**GREEDY)
    assert caption_images(talkative_vlm, images[:3], sink, batch_size=2, sampling=greedy).done == 3
    sink.close()
    with open(sink.journal, "a") as f:  # what a kill in the middle of a write would leave
        f.write(f'{{"image": "{images[3]}", "capt')

    sink = RecordFile(out, rank=0)
    summary = caption_images(talkative_vlm, images, sink, batch_size=2, sampling=greedy)
    sink.close()
    assert (summary.done, summary.skipped, summary.failed) == (2, 3, [])
    journal = [json.loads(line) for line in sink.journal.read_text().splitlines()]
    assert [r["image"] for r in journal] == [str(p) for p in images]
    sink.merge()
    assert not sink.journal.exists()
    want = talkative_vlm.generate([(p, "", None) for p in images], template="base", **GREEDY)
    assert RecordFile(out, rank=0).records == {str(p): w for p, w in zip(images, want)}
    again = caption_images(talkative_vlm, images, RecordFile(out, rank=0), sampling=greedy)
    assert (again.done, again.skipped) == (0, 5)


@pytest.mark.parametrize("args, message", [
    (["missing-folder"], "no such file or folder: missing-folder"),
    (["{data}", "--output", "captions.txt"], "--output must end in .jsonl or .csv"),
    (["{data}", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["{data}", "--top_p", "7"], "invalid top_p=7.0"),
    (["{data}", "--output", "{data}/a/scene00.jpg/captions.jsonl"], "cannot write {data}/a/scene00.jpg/captions.jsonl"),
])
def test_user_mistakes_get_one_line_messages(args, message, dataset, capsys):
    assert main(["caption", *(a.format(data=dataset) for a in args)]) == 2
    err = capsys.readouterr().err
    assert f"cogvlm caption: error: {message.format(data=dataset)}" in err and "Traceback" not in err


def test_a_folder_without_images_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no pictures here")
    assert main(["caption", str(tmp_path), "--model", "cogvlm-tiny"]) == 2
    err = capsys.readouterr().err
    assert f"cogvlm caption: error: no images (.bmp, .gif, .jpeg, .jpg, .png, .tif, .tiff, .webp) in {tmp_path}" in err
    assert "Traceback" not in err
