"""`cogvlm caption` on video clips with a tiny random CogVLM2-Video in the published layout
(conftest.video_checkpoint): folders, tar shards with video members and Parquet with clip bytes or
paths; a corrupt clip among good ones is recorded and the rest are captioned exactly once; a run
SIGKILLed midway and rerun captions nothing twice. Captions must equal the API's one clip at a time
(`CogVLM.generate` on the file, chat template, the captioner's question, greedy)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import pytest

pytest.importorskip("av")

from cogvlm.api import VIDEO_CAPTION_PROMPT  # noqa: E402
from cogvlm.caption import Media, RecordFile, caption_images, caption_shards, find_files  # noqa: E402
from cogvlm.data.shards import VIDEO_EXTENSIONS, Columns, ShardWriter  # noqa: E402

from .test_video import make_clip  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
NEW_TOKENS = 6
GREEDY = {"top_k": 1, "max_new_tokens": NEW_TOKENS}
GREEDY_FLAGS = ["--top_k", "1", "--max_new_tokens", str(NEW_TOKENS)]
CORRUPT = b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 4  # an MP4 header, then nothing a demuxer can use


CONTAINERS = (("mp4", ".mp4"), ("matroska", ".mkv"), ("avi", ".avi"))


def clip(n: int) -> bytes:
    """Clip n: 2 to 4 s at 2 fps, 32x24, in CONTAINERS[n % 3], its frames coloured from colour n*7 on."""
    seconds = 2 + n % 3
    return make_clip(range(2 * seconds), Fraction(1, 2), 2, codec="mpeg4", fmt=CONTAINERS[n % 3][0], first=n * 7)


@pytest.fixture(scope="module")
def video_vlm(video_checkpoint: Path):
    from cogvlm import CogVLM

    return CogVLM.from_pretrained(video_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 clips in nested folders (.mp4, .mkv, .avi containers), a corrupt .mp4 and a text file."""
    root = tmp_path_factory.mktemp("clips")
    for n in range(7):
        folder = root / ("a" if n < 3 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"clip{n}{CONTAINERS[n % 3][1]}").write_bytes(clip(n))
    (root / "a" / "broken.mp4").write_bytes(CORRUPT)
    (root / "notes.txt").write_text("not a clip")
    return root


def one_at_a_time(vlm, sources) -> list[str]:
    return [vlm.generate([(None, VIDEO_CAPTION_PROMPT, None, s)], "chat", **GREEDY)[0] for s in sources]


@pytest.fixture(scope="module")
def want(video_vlm, clips) -> dict[str, str]:
    """Each good clip's caption from the API, decoded and captioned alone."""
    good = sorted(clips.rglob("clip*"))
    return dict(zip((str(p) for p in good), one_at_a_time(video_vlm, good)))


def test_a_folder_of_clips_corrupt_one_recorded_rest_captioned_once(video_vlm, clips, want, tmp_path):
    files = find_files([clips], VIDEO_EXTENSIONS)
    assert [p.name for p in files] == ["broken.mp4", "clip0.mp4", "clip1.mkv", "clip2.avi", "clip3.mp4",
                                       "clip4.mkv", "clip5.avi", "clip6.mp4"]
    sink = RecordFile(tmp_path / "captions.jsonl", 0, "video")
    summary = caption_images(video_vlm, files, sink, VIDEO_CAPTION_PROMPT, "chat", batch_size=3,
                             sampling=video_vlm.sampling(**GREEDY), media=Media(video=True), decoders=3,
                             progress=False)
    sink.close()
    assert summary.done == 7 and len(summary.failed) == 1
    assert "broken.mp4 is corrupt or truncated" in summary.failed[0]
    lines = [json.loads(line) for line in sink.journal.read_text().splitlines()]
    assert sorted(r["video"] for r in lines) == sorted(want)  # each once, the broken one not at all
    assert {r["video"]: r["caption"] for r in lines} == want
    assert len(set(want.values())) > 1, "the clips should get different captions"
    sink.merge()
    assert [json.loads(line)["video"] for line in (tmp_path / "captions.jsonl").read_text().splitlines()] == \
        sorted(want)


def test_the_base_template_samples_by_the_base_rule(video_vlm, clips):
    path = clips / "a" / "clip1.mkv"
    base = video_vlm.generate([(None, "describe", None, path)], "base", **GREEDY)
    sink = RecordFile(clips.parent / "base.jsonl", 0, "video")
    caption_images(video_vlm, [path], sink, "describe", "base", sampling=video_vlm.sampling(**GREEDY),
                   media=Media(video=True), progress=False)
    sink.close()
    assert json.loads(sink.journal.read_text())["caption"] == base[0]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_and_parquet_shards_of_clips(video_vlm, clips, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [clip(n) for n in range(4)]
    write_tar(tmp_path / "s0.tar", [("k0.mp4", data[0]), ("k0.json", b"{}"), ("k1.mp4", CORRUPT),
                                    ("k2.json", b"{}"), ("k3.mp4", data[1])])
    (tmp_path / "x.mp4").write_bytes(data[3])
    pq.write_table(pa.table({"key": ["p0", "p1", "p2"], "video": pa.array([data[2], CORRUPT, None], pa.binary())}),
                   tmp_path / "bytes.parquet")
    pq.write_table(pa.table({"id": ["q0", "q1"], "path": ["x.mp4", "missing.mp4"]}), tmp_path / "paths.parquet")
    shards = [tmp_path / "s0.tar", tmp_path / "bytes.parquet", tmp_path / "paths.parquet"]
    writer = ShardWriter(tmp_path / "out")
    summary = caption_shards(video_vlm, shards, writer, Columns(video=True), VIDEO_CAPTION_PROMPT, "chat",
                             batch_size=2, sampling=video_vlm.sampling(**GREEDY), media=Media(video=True),
                             decoders=2, progress=False)
    assert summary.shards_written == 3 and summary.done == 4 and len(summary.failed) == 5
    rows = {}
    for name in ("s0", "bytes", "paths"):
        rows.update({r["id"]: r for r in pq.read_table(tmp_path / "out" / f"{name}.parquet").to_pylist()})
    assert list(rows) == ["k0", "k1", "k2", "k3", "p0", "p1", "p2", "q0", "q1"]
    want = dict(zip(["k0", "k3", "p0", "q0"], one_at_a_time(video_vlm, [data[0], data[1], data[2], data[3]])))
    for key, row in rows.items():
        assert (row["caption"], row["error"] is None) == ((want[key], True) if key in want else (None, False)), key
    assert "s0.tar sample k1 is corrupt or truncated" in rows["k1"]["error"]
    assert rows["k2"]["error"] == f"sample k2 of {tmp_path / 's0.tar'} has no video (members: .json)"
    assert "bytes.parquet sample p1 is corrupt" in rows["p1"]["error"]
    assert rows["p2"]["error"] == f"row p2 of {tmp_path / 'bytes.parquet'} has no video"
    assert "video file not found" in rows["q1"]["error"]
    assert rows["k0"]["prompt"] == "" and rows["k0"]["model"] == ""  # meta is the CLI's to fill
    wds = ShardWriter(tmp_path / "wds", "wds")
    caption_shards(video_vlm, shards[:1], wds, Columns(video=True), VIDEO_CAPTION_PROMPT, "chat", batch_size=2,
                   sampling=video_vlm.sampling(**GREEDY), media=Media(video=True), decoders=2, progress=False)
    with tarfile.open(tmp_path / "wds" / "s0.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
    assert list(members) == ["k0.mp4", "k0.json", "k0.txt", "k1.mp4", "k1.error", "k2.json", "k2.error", "k3.mp4",
                             "k3.txt"]
    assert members["k0.mp4"] == data[0] and members["k3.txt"].decode() == want["k3"]


def test_clip_samples_are_bounded_by_the_video_limit(tmp_path):
    """The shard size checks hold for clips: a tar member or a Parquet cell over Columns.max_bytes
    is an error row naming --max-video-bytes (decided on the header or the metadata, unread), and a
    clip path is read only up to the limit; a clip within it decodes as before."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cogvlm.caption import load_sample
    from cogvlm.data.shards import Sample, samples

    small = clip(0)
    big, limit = small * 20, len(small) * 5  # past the limit whatever the Parquet pages add (never decoded)
    write_tar(tmp_path / "s.tar", [("a.mp4", small), ("b.mp4", big)])
    pq.write_table(pa.table({"video": pa.array([small, big], pa.binary())}), tmp_path / "v.parquet",
                   row_group_size=1)
    columns = Columns(max_bytes=limit, video=True)
    for shard in ("s.tar", "v.parquet"):
        rows = list(samples(tmp_path / shard, columns))
        assert rows[0].image == small and rows[0].error is None, shard
        assert rows[1].image is None and f"over the limit of {limit}" in rows[1].error, shard
        assert "(--max-video-bytes)" in rows[1].error, shard
    (tmp_path / "big.mp4").write_bytes(big)
    why = load_sample(tmp_path, Sample("b", str(tmp_path / "big.mp4")), Media(video=True), limit)
    assert why == f"{tmp_path / 'big.mp4'} is over the limit of {limit} bytes for one video"
    (tmp_path / "small.mp4").write_bytes(small)
    frames = load_sample(tmp_path, Sample("a", str(tmp_path / "small.mp4")), Media(video=True), limit)
    assert not isinstance(frames, str) and frames.shape[0] == 3


def cogvlm(*args: str, cwd: Path, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cogvlm", "caption", *args], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_cli_killed_midway_then_rerun_captions_each_clip_once(video_checkpoint, clips, want, tmp_path):
    """A real SIGKILL once the first captions are journaled; the rerun skips those and does the
    rest; the output holds each good clip once, with the captions of the API."""
    out = tmp_path / "captions.jsonl"
    journal = tmp_path / "captions.jsonl.rank0.part"
    args = [str(clips), "--model", str(video_checkpoint), "--output", str(out), *GREEDY_FLAGS, "--batch-size", "1",
            "--decoders", "2"]
    first = cogvlm(*args, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while not (journal.exists() and journal.read_text().count("\n") >= 1) and first.poll() is None:
        assert time.monotonic() < deadline, "no caption journaled in time"
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = {json.loads(line)["video"] for line in journal.read_text().splitlines() if line.endswith("}")}
    assert 1 <= len(done_before) < 7, f"the first run was not stopped midway ({len(done_before)} done)"
    second = cogvlm(*args, cwd=tmp_path)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    captioned = 7 - len(done_before)
    assert f"{captioned} captioned, {len(done_before)} skipped (already done), 1 failed (of 8 clips)" in stdout
    assert "clips/s" in stdout and "Traceback" not in stderr
    assert "broken.mp4 is corrupt or truncated" in stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["video"] for r in records] == sorted(want)
    assert {r["video"]: r["caption"] for r in records} == want
    assert not journal.exists()


def test_cli_writes_a_caption_next_to_each_clip(video_checkpoint, clips, want, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(clips, root)
    dry = cogvlm(".", "--model", str(video_checkpoint), "--dry-run", cwd=root)
    assert "would caption 8 of 8 clips (0 already done)" in dry.communicate(timeout=120)[0]
    run = cogvlm(".", "--model", str(video_checkpoint), *GREEDY_FLAGS, cwd=root)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert "7 captioned, 0 skipped (already done), 1 failed (of 8 clips)" in stdout
    for path, caption in want.items():
        assert (root / Path(path).relative_to(clips)).with_suffix(".txt").read_text() == caption + "\n"
    assert not (root / "a" / "broken.txt").exists()


@pytest.mark.slow
def test_ray_captions_video_shards_as_one_machine_does(video_checkpoint, video_vlm, tmp_path):
    """--ray on a local Ray instance, one CPU replica decoding on 2 threads: a tar of clips (one
    corrupt) and a Parquet of clip bytes give the rows of the single-machine run."""
    pytest.importorskip("ray.data")
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [clip(n) for n in range(3)]
    write_tar(tmp_path / "t.tar", [("a.mp4", data[0]), ("b.mkv", CORRUPT), ("c.mp4", data[1])])
    pq.write_table(pa.table({"key": ["d"], "video": pa.array([data[2]], pa.binary())}), tmp_path / "p.parquet")
    env = {**ENV, "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.01", "RAY_AUTH_MODE": "disabled"}
    run = subprocess.run([sys.executable, "-m", "cogvlm", "caption", "t.tar", "p.parquet", "--output", "out",
                          "--model", str(video_checkpoint), *GREEDY_FLAGS, "--batch-size", "2", "--ray",
                          "--decoders", "2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "3 captioned, 1 failed; shards: 2 written" in run.stdout
    rows = {r["id"]: r for name in ("t", "p") for r in pq.read_table(tmp_path / "out" / f"{name}.parquet").to_pylist()}
    want = dict(zip("acd", one_at_a_time(video_vlm, data)))
    assert {k: r["caption"] for k, r in rows.items()} == {**want, "b": None}
    assert "sample b is corrupt or truncated" in rows["b"]["error"]
    assert rows["a"]["prompt"] == f"Question: {VIDEO_CAPTION_PROMPT} Answer:"


def test_clips_are_prepared_for_the_tower_where_they_are_decoded(video_vlm, clips):
    """A caption job's Media prepares each clip for the model's tower in the decoder thread
    (`TowerFrames`): the same pixels, bit for bit, as the model's own preprocessing of the decoded
    clip, and the API answers on them exactly as on the file; frames prepared for another tower
    size are a VideoError naming the shapes."""
    import torch

    from cogvlm.errors import VideoError
    from cogvlm.image import TowerFrames, preprocess_frames
    from cogvlm.video import load_video

    path = sorted(clips.rglob("clip*"))[0]
    media = Media(video=True).for_model("chat", video_vlm.config)
    prepared = media.load(path)
    size = video_vlm.config.vision.image_size
    assert isinstance(prepared, TowerFrames) and media.frame_size == size
    assert torch.equal(prepared.pixels, preprocess_frames(load_video(path, "chat"), size))
    assert one_at_a_time(video_vlm, [prepared]) == one_at_a_time(video_vlm, [path])
    with pytest.raises(VideoError, match=rf"takes \(frames, 3, {size}, {size}\)"):
        video_vlm.generate([(None, "hi", None, TowerFrames(prepared.pixels[:, :, :-1]))], "chat", **GREEDY)
