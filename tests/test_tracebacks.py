"""Issue #37 item 14: what used to end in a traceback ends in one named line and exit 2. The real
`python -m cogvlm` for command mistakes; a file-size limit (RLIMIT_FSIZE, which makes a write
fail with EFBIG as a full disk fails with ENOSPC, through the same code path) for convert, caption
and eval; non-UTF-8 file and tar member names; crafted VLMEvalKit TSV rows. Crafted checkpoints are
in test_crafted_checkpoints.py, tar/Parquet/pickle sizes in test_hardening_data.py."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cogvlm.errors import UsageError
from tests import eval_fixtures as F
from tests.test_caption import ENV
from tests.test_caption_datasets import add, encoded

OFFLINE = {**ENV, "HF_HUB_OFFLINE": "1"}


def one_line(result: subprocess.CompletedProcess, verb: str) -> str:
    """The single `cogvlm VERB: error: ...` line of a failed run (argparse puts its usage first;
    caption its progress lines), exit code 2, no traceback."""
    err = result.stderr
    assert result.returncode == 2 and "Traceback" not in err, err
    noise = re.compile(r"^(usage:| |cogvlm caption: \d+|cogvlm: loading|eval: )")
    lines = [line for line in err.strip().splitlines() if not noise.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"cogvlm {verb}: error: "), err
    return lines[0]


def cogvlm(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogvlm", *argv], cwd=cwd, env=env or OFFLINE, capture_output=True,
                          text=True, timeout=300)


# ---- command mistakes that were tracebacks, on the real command -------------------------------

MISTAKES = [
    (["convert", "cogvlm-tiny", "/dev/null/x"], "cannot write /dev/null/x"),
    (["convert", "cogvlm-tiny", "out", "--shard-gb", "nan"], "--shard-gb: must be a finite number > 0, not nan"),
    (["convert", "cogvlm-tiny", "out", "--shard-gb", "inf"], "must be a finite number > 0, not inf"),
    (["convert", "cogvlm-tiny", "out", "--shard-gb", "0"], "must be a finite number > 0, not 0"),
    (["plan", "cogvlm-tiny", "--tp", "0"], "--tp: must be >= 1, not 0"),
    (["chat", "--model", "cogvlm-tiny", "--query", "hi", "--tp", "-2"], "--tp: must be >= 1, not -2"),
    (["serve", "--model", "cogvlm-tiny", "--port", "70000"], "--port: must be a port number 0-65535, not 70000"),
    (["web", "--model", "cogvlm-tiny", "--port", "-1"], "--port: must be a port number 0-65535, not -1"),
    (["finetune", "--data", "ok.jsonl", "--model", "cogvlm-tiny", "--out", "ft", "--lr", "nan"],
     "--lr must be a finite number > 0, not nan"),
    (["finetune", "--data", "ok.jsonl", "--model", "cogvlm-tiny", "--out", "ft", "--lr", "-1"],
     "--lr must be a finite number > 0, not -1.0"),
    (["finetune", "--data", "ok.jsonl", "--model", "cogvlm-tiny", "--out", "ft", "--lora", "--lora-r", "0"],
     "--lora-r must be a finite number >= 1, not 0"),
    (["finetune", "--data", "ok.jsonl", "--model", "cogvlm-tiny", "--out", "ft", "--batch-size", "0"],
     "--batch-size must be a finite number >= 1, not 0"),
    (["finetune", "--data", "ok.jsonl", "--model", "cogvlm-tiny", "--out", "ft", "--min-lr-ratio", "2"],
     "--min-lr-ratio must be between 0 and 1, not 2.0"),
    (["caption", "img", "--max-image-bytes", "0"], "--max-image-bytes must be >= 1, not 0"),
    (["eval", "--task", "textvqa", "--annotations", "bad.tsv"], "bad.tsv, row 1: unexpected content"),
]


@pytest.mark.parametrize("argv, message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_command_mistakes_are_one_line(argv, message, tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"image": null, "template": "chat", "turns": [{"query": "a", "answer": "b"}]}\n')
    (tmp_path / "img").mkdir()
    (tmp_path / "bad.tsv").write_text("index\timage\tquestion\n1\n")  # a row shorter than its header
    line = one_line(cogvlm(*argv, cwd=tmp_path), argv[0])
    assert message in line, line
    assert not (tmp_path / "out").exists() and not (tmp_path / "ft").exists()


# ---- a full disk: WriteError, one line, no half-written file ------------------------------------

FULL_DISK = ("import resource, signal, sys\nsignal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
             "from cogvlm.cli import main\nresource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
             "sys.exit(main(sys.argv[1:]))")


def on_full_disk(*argv: str, cwd: Path, limit: int = 100) -> subprocess.CompletedProcess:
    """`cogvlm ARGV` where every write past `limit` bytes of a file fails (EFBIG), as on a full disk."""
    return subprocess.run([sys.executable, "-c", FULL_DISK.format(limit=limit), *argv], cwd=cwd, env=OFFLINE,
                          capture_output=True, text=True, timeout=300)


def test_convert_on_a_full_disk_writes_nothing(tiny_checkpoint, tmp_path):
    """Before: a traceback out of safetensors, and the temporary folder left behind."""
    line = one_line(on_full_disk("convert", str(tiny_checkpoint), str(tmp_path / "out"), cwd=tmp_path, limit=4096),
                    "convert")
    assert "cannot write" in line and "nothing was written" in line
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_eval_on_a_full_disk_reports_the_write_error(tmp_path):
    """The predictions journal and the JSONL mode's --output: one line naming the file."""
    from cogvlm.data.synthetic import make_dataset

    paths = F.refcoco_files(tmp_path)
    line = one_line(on_full_disk("eval", "--task", "refcoco", "--annotations", *map(str, paths), "--images",
                                 str(tmp_path / "images"), "--out", str(tmp_path / "run"), "--batch-size", "1",
                                 cwd=tmp_path, limit=30), "eval")
    assert "cannot write" in line and str(tmp_path / "run") in line, line
    assert not list((tmp_path / "run").glob(".*.tmp"))
    data = make_dataset(tmp_path / "set", 1, seed=31, image_size=112, tasks=("vqa",))
    line = one_line(on_full_disk("eval", str(data), "--output", str(tmp_path / "r.json"), cwd=tmp_path, limit=30),
                    "eval")
    assert "cannot write" in line and "r.json" in line
    assert not (tmp_path / "r.json").exists() and not list(tmp_path.glob(".r.json*"))


def test_caption_shards_on_a_full_disk_leave_no_shard(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add(tar, "00000.png", encoded(1)[1])
    line = one_line(on_full_disk("caption", str(tmp_path / "s.tar"), "--output", str(tmp_path / "out"), "--model",
                                 "cogvlm-tiny", "--max_new_tokens", "2", cwd=tmp_path, limit=200), "caption")
    assert "cannot write" in line and list((tmp_path / "out").iterdir()) == []


# ---- non-UTF-8 names ---------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform != "linux", reason="file names are bytes on Linux")
def test_non_utf8_file_names_are_captioned_and_resumed(tmp_path):
    """Before: UnicodeEncodeError writing the journal (a lone surrogate), on every rerun."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / os.fsdecode(b"\xffname.png")).write_bytes(encoded(1)[1])
    (folder / "ok.png").write_bytes(encoded(3)[1])
    for output in ("c.jsonl", "c.csv"):
        args = ("caption", str(folder), "--output", str(tmp_path / output), "--model", "cogvlm-tiny",
                "--max_new_tokens", "2")
        first, second = cogvlm(*args, cwd=tmp_path), cogvlm(*args, cwd=tmp_path)
        assert first.returncode == 0 and "2 captioned" in first.stdout, first.stderr
        assert second.returncode == 0 and "0 captioned, 2 skipped" in second.stdout, second.stderr
        assert "\\xffname.png" in (tmp_path / output).read_text(encoding="utf-8")


@pytest.mark.skipif(sys.platform != "linux", reason="tar names are bytes")
def test_non_utf8_tar_member_names_are_captioned(tmp_path):
    """A member name that is not UTF-8 keeps its bytes in a wds output and is \\xNN text in Parquet
    (before: pyarrow could not encode the id, and the shard was lost)."""
    name = os.fsdecode(b"k\xe9y.png")
    with tarfile.open(tmp_path / "s.tar", "w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        add(tar, name, encoded(1)[1])
        add(tar, "plain.png", encoded(3)[1])
    run = cogvlm("caption", str(tmp_path / "s.tar"), "--output", str(tmp_path / "out"), "--model", "cogvlm-tiny",
                 "--max_new_tokens", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    table = pq.read_table(tmp_path / "out" / "s.parquet").to_pydict()
    assert table["id"] == ["k\\xe9y", "plain"] and table["error"] == [None, None]
    run = cogvlm("caption", str(tmp_path / "s.tar"), "--output", str(tmp_path / "wds"), "--format", "wds", "--model",
                 "cogvlm-tiny", "--max_new_tokens", "2", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    with tarfile.open(tmp_path / "wds" / "s.tar", encoding="utf-8", errors="surrogateescape") as out:
        assert os.fsdecode(b"k\xe9y.txt") in out.getnames() and name in out.getnames()


# ---- VLMEvalKit TSV rows -------------------------------------------------------------------------

PNG = base64.b64encode(encoded(1)[1]).decode()


@pytest.mark.parametrize("text, message", [
    ("index\timage\tquestion\n1\n", "row 1: unexpected content (TypeError"),
    (f"index\timage\tquestion\tanswer\n1\t{PNG}\tq\ta\n2\t7\tq\ta\n", "row 2: no '7' field"),
    ("index\timage\n1\tnot base64!\n", "row 1 has no base64 image"),
    (b"index\timage\n\xff\xfe\n", "is not UTF-8 text"),
    ("index\timage\tquestion\tanswer\n1\t" + PNG + "\tq\t[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\n", None),
    ("index\timage\tquestion\tanswer\n1\t" + PNG + "\tq\t[1e999999, 10**10**10]\n", None),
])
def test_crafted_tsv_rows_are_named(tmp_path, text, message):
    from cogvlm.eval.formats.vlmevalkit import read_tsv

    path = tmp_path / "TextVQA_VAL.tsv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    if message is None:  # an answer that is not a literal list stays text
        assert len(read_tsv([path], "vqa", None).items) == 1
        return
    with pytest.raises(UsageError, match=re.escape(message)):
        read_tsv([path], "vqa", None)


def test_crafted_annotation_records_are_named(tmp_path):
    """Every publisher reader indexes records directly (VQAv2's questions and annotations here):
    a record without its fields was a KeyError traceback; now one UsageError naming the files."""
    import json

    from cogvlm.eval.runner import read_benchmark
    from cogvlm.eval.tasks import TASKS

    paths = F.vqa_files(tmp_path)
    questions = json.loads(paths[0].read_text())
    questions["questions"][0].pop("question_id")
    paths[0].write_text(json.dumps(questions))
    with pytest.raises(UsageError, match="a record: no 'question_id' field"):
        read_benchmark(TASKS["vqav2"], paths, tmp_path / "images", None)
