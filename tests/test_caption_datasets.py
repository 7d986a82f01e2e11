"""`cogvlm caption` on datasets: real webdataset tar shards and Parquet files (bytes and paths),
with corrupt, truncated and missing images, captioned by real subprocesses; a SIGKILL mid-shard
and a rerun; Ray Data on a local instance with a replica killed by PID (slow). Captions must equal
`CogVLM.caption` (base template, empty query, greedy) on the same image bytes."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogvlm.caption import caption_shards
from cogvlm.cli import main
from cogvlm.data.synthetic import make_scene
from cogvlm.data.shards import Columns, ShardWriter
from cogvlm.image import load_image
from tests.test_caption import ENV

NEW_TOKENS = 24
GREEDY = {"top_k": 1, "max_new_tokens": NEW_TOKENS}
GREEDY_FLAGS = ["--top_k", "1", "--max_new_tokens", str(NEW_TOKENS)]
CORRUPT = b"\x89PNG\r\n\x1a\n" + bytes(40)
TARS = ["00000.tar", "00001.tar", "00002.tar"]
SHARDS = ["tars/{00000..00002}.tar", "bytes.parquet", "paths.parquet"]
OUTPUTS = ["00000", "00001", "00002", "bytes", "paths"]


def encoded(i: int) -> tuple[str, bytes]:
    fmt = "png" if i % 2 else "jpeg"
    out = io.BytesIO()
    make_scene(i, 48).image.save(out, fmt)
    return ("png" if i % 2 else "jpg"), out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[tuple[str, bytes | None]]]]:
    """30 scenes and 6 bad samples in 3 tar shards and 2 Parquet files; per output shard, its
    (id, image bytes or None for a bad sample) in order."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "tars").mkdir()
    (root / "img").mkdir()
    expect: dict[str, list[tuple[str, bytes | None]]] = {}
    bad = {0: ("c0", "png", CORRUPT), 1: ("t1", "jpg", encoded(0)[1][:300]), 2: ("n2", None, None)}
    for s, name in enumerate(TARS):
        rows = expect[name[:-4]] = []
        with tarfile.open(root / "tars" / name, "w") as tar:
            for i in range(8 * s, 8 * s + 8):
                ext, image = encoded(i)
                key = f"{i:05d}"
                for member, payload in ((ext, image), ("json", b'{"i": %d}' % i), ("txt", f"alt {i}".encode())):
                    add(tar, f"{key}.{member}", payload)
                rows.append((key, image))
                if i == 8 * s + 3:  # a bad sample in the middle of each shard
                    key, ext, payload = bad[s]
                    add(tar, f"{key}.json", b"{}")
                    if ext:
                        add(tar, f"{key}.{ext}", payload)
                    rows.append((key, None))
    images = [encoded(i)[1] for i in range(24, 28)]
    pq.write_table(pa.table({"key": ["b24", "b25", "bad", "b26", "b27"],
                             "jpg": pa.array(images[:2] + [CORRUPT] + images[2:], pa.binary())}), root / "bytes.parquet")
    expect["bytes"] = [("b24", images[0]), ("b25", images[1]), ("bad", None), ("b26", images[2]), ("b27", images[3])]
    paths = []
    for i in (28, 29):
        ext, image = encoded(i)
        (root / "img" / f"s{i}.{ext}").write_bytes(image)
        paths.append((f"img/s{i}.{ext}", image))
    (root / "img" / "cut.jpg").write_bytes(encoded(0)[1][:300])
    paths[1:1] = [("img/missing.png", None), ("img/cut.jpg", None)]
    pq.write_table(pa.table({"path": [p for p, _ in paths]}), root / "paths.parquet")
    expect["paths"] = [(str(n), image) for n, (_, image) in enumerate(paths)]
    return root, expect


@pytest.fixture(scope="module")
def want(data, talkative_vlm) -> dict[bytes, str]:
    """`CogVLM.caption` of every good image, one at a time (on one thread, as the runs under test:
    on a busy machine more threads than free cores are many times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {image: talkative_vlm.caption(load_image(image), **GREEDY)
                for rows in data[1].values() for _, image in rows if image is not None}
    finally:
        torch.set_num_threads(threads)


def cogvlm(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogvlm", *args], cwd=cwd, env={**ENV, **kw.pop("env", {})},
                          capture_output=True, text=True, timeout=600, **kw)


def check_outputs(out: Path, expect, want) -> dict[str, list[dict]]:
    """Every output shard holds each sample of its input once, in order: the caption of a good one,
    the error of a bad one."""
    tables = {}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.parquet" for n in OUTPUTS), "no temporary files"
    for name, rows in expect.items():
        table = pq.read_table(out / f"{name}.parquet")
        assert table.column_names == ["id", "caption", "model", "prompt", "sampling", "error"]
        got = table.to_pylist()
        assert [r["id"] for r in got] == [key for key, _ in rows]
        for r, (_, image) in zip(got, rows):
            if image is None:
                assert r["caption"] is None and r["error"], r
            else:
                assert (r["caption"], r["error"]) == (want[image], None)
        assert {(r["prompt"], r["sampling"].count('"max_new_tokens": 24')) for r in got} == {("", 1)}
        tables[name] = got
    return tables


@pytest.fixture(scope="module")
def full_run(data, talkative, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("full") / "captions"
    return out, cogvlm("caption", *SHARDS, "--output", str(out), "--model", str(talkative), *GREEDY_FLAGS,
                       "--batch-size", "4", "--log-every", "0.001", cwd=data[0])


def test_tar_and_parquet_shards_are_captioned_once_with_errors_recorded(full_run, data, want):
    out, run = full_run
    assert run.returncode == 0, run.stderr
    assert "30 captioned, 6 failed; shards: 5 written, 0 skipped (already done), 0 unreadable" in run.stdout
    assert len(set(want.values())) > 20, "the captions should differ from image to image"
    tables = check_outputs(out, data[1], want)
    errors = {r["id"]: r["error"] for rows in tables.values() for r in rows if r["error"]}
    assert errors["c0"] == "tars/00000.tar sample c0 is not an image file in a format we read (PNG, JPEG, WebP, BMP, GIF, TIFF)"
    assert errors["t1"].startswith("tars/00001.tar sample t1 is corrupt or truncated")
    assert errors["n2"] == "sample n2 of tars/00002.tar has no image (members: .json)"
    assert errors["1"].startswith("image file not found:") and "missing.png" in errors["1"]
    assert "cut.jpg is corrupt or truncated" in errors["2"]
    # off a terminal: progress as log lines, no carriage returns
    assert "\r" not in run.stderr and "Traceback" not in run.stderr
    assert re.search(r"^cogvlm caption: \d+ img \([\d.]+ img/s\) tokens/s=[\d.]+ failed=\d+ shard=\d/5$", run.stderr,
                     re.M), run.stderr
    assert "images/s" in run.stdout and "tokens/s" in run.stdout


def test_webdataset_output_keeps_each_sample_and_adds_the_caption(data, talkative, want, tmp_path):
    import webdataset as wds

    run = cogvlm("caption", "tars/{00000..00002}.tar", "--output", str(tmp_path), "--format", "wds",
                 "--caption-key", "cogvlm.txt", "--model", str(talkative), *GREEDY_FLAGS, "--batch-size", "3",
                 cwd=data[0])
    assert run.returncode == 0, run.stderr
    assert "24 captioned, 3 failed; shards: 3 written" in run.stdout
    samples = list(wds.WebDataset(str(tmp_path / "{00000..00002}.tar"), shardshuffle=False))
    expect = [row for name in ("00000", "00001", "00002") for row in data[1][name]]
    assert [s["__key__"] for s in samples] == [key for key, _ in expect]
    for sample, (key, image) in zip(samples, expect):
        if image is None:
            assert "cogvlm.txt" not in sample and f"sample {key}" in sample["error"].decode()
        else:
            assert sample["cogvlm.txt"].decode() == want[image]
            assert sample[next(e for e in ("jpg", "png") if e in sample)] == image
            assert sample["txt"] == f"alt {int(key)}".encode(), "img2dataset's alt text stays"


def test_killed_run_resumes_per_shard_exactly_once(full_run, data, talkative, want, tmp_path):
    root, expect = data
    out = tmp_path / "captions"
    args = ["caption", *SHARDS, "--output", str(out), "--model", str(talkative), *GREEDY_FLAGS,
            "--batch-size", "2", "--log-every", "0.001"]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cogvlm", *args], cwd=root, env=ENV, stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while "shard=2/5" not in (tmp_path / "log").read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # in the middle of shard 2: one batch of it done, not written
    proc.wait(timeout=30)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["00000.parquet"], f"the kill should land in shard 2: {written}"
    (out / ".00001.parquet.tmp").write_bytes(b"half a shard")  # what a kill during a write leaves

    dry = cogvlm(*args, "--dry-run", cwd=root)
    assert dry.returncode == 0, dry.stderr
    lines = dry.stdout.splitlines()
    assert lines[0] == f"done  tars/00000.tar -> {out}/00000.parquet  (9 samples)"
    assert lines[1] == f"redo  tars/00001.tar -> {out}/00001.parquet  (9 samples)"
    assert lines[4] == f"todo  paths.parquet -> {out}/paths.parquet  (4 samples)"
    assert "would caption 4 of 5 shards" in lines[5]

    rerun = cogvlm(*args, cwd=root)
    assert rerun.returncode == 0, rerun.stderr
    assert "22 captioned, 5 failed; shards: 4 written, 1 skipped (already done)" in rerun.stdout
    assert check_outputs(out, expect, want) == check_outputs(full_run[0], expect, want)


def test_a_damaged_shard_is_reported_and_the_others_written(data, talkative_vlm, want, tmp_path):
    root, expect = data
    cut = tmp_path / "cut.tar"
    cut.write_bytes((root / "tars" / "00001.tar").read_bytes()[:1000])  # ends inside its first member
    shards = [cut, root / "tars" / "00000.tar"]
    summary = caption_shards(talkative_vlm, shards, ShardWriter(tmp_path / "out"), Columns(), batch_size=4,
                             sampling=talkative_vlm.sampling(**GREEDY), progress=False)
    assert (summary.shards_written, summary.done, len(summary.failed)) == (1, 8, 1)
    assert summary.shards_failed == [f"{cut} cannot be read: unexpected end of data"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["00000.parquet"]
    got = pq.read_table(tmp_path / "out" / "00000.parquet").to_pydict()
    assert got["caption"] == [want.get(image) for _, image in expect["00000"]]


@pytest.mark.parametrize("args, message", [
    (["bytes.parquet"], "give --output DIR"),
    (["bytes.parquet", "--output", "c.jsonl"], "give --output DIR"),
    (["bytes.parquet", "img", "--output", "o"], "give either tar/Parquet shards or images and folders"),
    (["bytes.parquet", "--output", "o", "--image-column", "png"], "bytes.parquet has no column 'png'; its columns "
                                                                  "are key, jpg (--image-column NAME picks one)"),
    (["paths.parquet", "--output", "o", "--id-column", "id"], "paths.parquet has no column 'id'"),
    (["bytes.parquet", "--output", "o", "--format", "wds"], "--format wds adds captions to webdataset tar shards"),
    (["tars/00000.tar", "--output", "tars", "--format", "wds"], "would overwrite the input shard tars/00000.tar"),
    (["tars/{00000..00009}.tar", "--output", "o"], "no such shard: tars/00003.tar"),
    (["tars/{00000..00002.tar", "--output", "o"], "unbalanced braces"),
    (["img", "--ray"], "--ray captions tar or Parquet shards"),
    (["img", "--replicas", "2"], "--ray-address, --replicas and --gpus-per-replica go with --ray"),
    (["tars/00000.tar", "--output", "o", "--caption-key", "a/b"], "--caption-key must be a file extension"),
])
def test_user_mistakes_get_one_line_messages(args, message, data, capsys, monkeypatch):
    monkeypatch.chdir(data[0])
    assert main(["caption", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cogvlm caption: error: ") and err.count("\n") == 1 and message in err, err
    assert not (data[0] / "o").exists()


def replica_pids(pid: int) -> list[int]:
    """The Ray actor processes of the model replicas, among the descendants of the run."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "Captioner" in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.slow
def test_ray_survives_a_killed_replica_with_every_sample_once(full_run, data, talkative, want, tmp_path):
    """Two CPU replicas on a local Ray instance; one is SIGKILLed once captions flow. Ray replaces
    it and retries its batch; the output equals the single-machine run's."""
    pytest.importorskip("ray.data")
    pytest.importorskip("psutil")
    root, expect = data
    out = tmp_path / "captions"
    env = {"RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.01", "RAY_AUTH_MODE": "disabled"}  # ~230 MB here
    args = ["caption", *SHARDS, "--output", str(out), "--model", str(talkative), *GREEDY_FLAGS, "--batch-size", "2",
            "--log-every", "0.001", "--ray", "--replicas", "2"]
    with open(tmp_path / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "cogvlm", *args], cwd=root, env={**ENV, **env}, stdout=log,
                                stderr=log)
    try:
        deadline = time.monotonic() + 400
        while " img (" not in (tmp_path / "log").read_text() and proc.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "log").read_text()
            time.sleep(0.05)
        pids = replica_pids(proc.pid)
        assert len(pids) == 2, (pids, (tmp_path / "log").read_text())
        os.kill(pids[0], signal.SIGKILL)
        seen = max(map(int, re.findall(r"caption: (\d+) img \(", (tmp_path / "log").read_text())))
        assert seen < 30, f"the kill should land mid-run, not after {seen} of 36 samples"
        assert proc.wait(timeout=400) == 0, (tmp_path / "log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "log").read_text()
    assert "30 captioned, 6 failed; shards: 5 written, 0 skipped (already done), 0 unreadable" in log
    assert check_outputs(out, expect, want) == check_outputs(full_run[0], expect, want)
    replicas = re.findall(r"cogvlm caption: replica \d+@\S+: (\d+) images, [\d.]+ images/s while busy", log)
    assert sum(map(int, replicas)) == 36, log
