"""Issue #37 (data files): small inputs must not make huge allocations, and what a data file names
must not reach outside it. Each test builds the real file (a tar, a Parquet table, a pickle, a
TSV), reads it the way `cogvlm caption` and `cogvlm eval` do, and failed before the fix. Memory
is measured in a child process (its peak RSS before and after the read), since an allocation of
hundreds of megabytes is what went wrong."""

from __future__ import annotations

import io
import json
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogvlm.data.shards import Columns, ShardWriter, samples
from cogvlm.errors import UsageError
from tests.test_caption import ENV
from tests.test_caption_datasets import add, encoded

BIG = 200 * 2**20  # a member or cell of zeros: a few hundred kB compressed


class Zeros(io.RawIOBase):
    """`size` zero bytes as a file, without holding them."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def peak_growth(code: str) -> tuple[int, str]:
    """Run `code` in a child after cogvlm's imports; (peak RSS growth in bytes, its stdout)."""
    script = ("import resource, sys\nfrom cogvlm.data.shards import Columns, samples\n"
              "from cogvlm.eval.formats.grounding import load_refs\nfrom pathlib import Path\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n" + code +
              "\nprint('GROWTH', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr
    growth = int(result.stdout.rsplit("GROWTH ", 1)[1])
    return growth, result.stdout


READ = "for s in samples(Path({path!r}), Columns()):\n    print(repr((s.key, s.error)))"


# ---- 10: sizes are checked where the file declares them, before reading -------------------------

def test_a_huge_tar_member_is_an_error_row_and_never_read(tmp_path):
    """A 200 MB member of zeros takes ~200 kB in a .tar.gz: before, the reader held all of it (and
    a sparse member of 4 GB took 10 kB); now its header's size is checked against the limit."""
    shard = tmp_path / "big.tar.gz"
    good = encoded(1)[1]
    with tarfile.open(shard, "w:gz", compresslevel=1) as tar:
        add(tar, "00000.png", good)
        info = tarfile.TarInfo("00001.jpg")
        info.size = BIG
        tar.addfile(info, Zeros(BIG))
        add(tar, "00002.png", good)
    assert shard.stat().st_size < 2**20
    growth, out = peak_growth(READ.format(path=str(shard)))
    rows = [eval(line) for line in out.splitlines() if line.startswith("(")]
    assert [key for key, _ in rows] == ["00000", "00001", "00002"] and rows[0][1] is None and rows[2][1] is None
    assert f"member 00001.jpg is {BIG} bytes, over the limit of {20 * 2**20} (--max-image-bytes)" in rows[1][1]
    assert growth < 50 * 2**20, growth


def test_a_huge_parquet_cell_is_an_error_row_and_never_read(tmp_path):
    """A 200 MB cell of zeros is ~10 kB of zstd: before, a batch read it and copied it to Python;
    now the row group's metadata says how large the column is before it is read."""
    shard = tmp_path / "big.parquet"
    good = encoded(1)[1]
    with pq.ParquetWriter(shard, pa.schema([("key", pa.string()), ("jpg", pa.binary())]), compression="zstd") as w:
        w.write_table(pa.table({"key": ["a"], "jpg": pa.array([good], pa.binary())}))
        w.write_table(pa.table({"key": ["b"], "jpg": pa.array([bytes(BIG)], pa.binary())}))
        w.write_table(pa.table({"key": ["c"], "jpg": pa.array([good], pa.binary())}))
    assert shard.stat().st_size < 2**20
    growth, out = peak_growth(READ.format(path=str(shard)))
    rows = [eval(line) for line in out.splitlines() if line.startswith("(")]
    assert rows[0] == ("a", None) and rows[2] == ("c", None), rows
    assert "over the limit of 20971520 per row (--max-image-bytes)" in rows[1][1]
    assert growth < 50 * 2**20, growth


def test_a_repeated_parquet_value_stays_one_value(tmp_path):
    """Dictionary encoding stores a repeated 1 MB value once: 2,000 rows of it are a 30 kB file.
    Read as dictionary indices, a batch holds one copy; each row becomes bytes only when it is
    used, so reading them all stays within a few batches."""
    shard = tmp_path / "repeat.parquet"
    value = bytes(2**20)
    pq.write_table(pa.table({"jpg": pa.DictionaryArray.from_arrays(pa.array([0] * 2000, pa.int32()),
                                                                     pa.array([value], pa.binary()))}),
                   shard, compression="zstd", row_group_size=2000)
    growth, out = peak_growth(f"n = sum(len(s.image) == {2**20} for s in samples(Path({str(shard)!r}), Columns()))\n"
                              "print('ROWS', n)")
    assert "ROWS 2000" in out and growth < 100 * 2**20, growth


def test_with_a_lower_limit_a_small_cell_is_refused_by_name(tmp_path):
    shard = tmp_path / "t.parquet"
    pq.write_table(pa.table({"jpg": pa.array([encoded(1)[1], b"x"], pa.binary())}), shard, row_group_size=1)
    rows = list(samples(shard, Columns(max_bytes=100)))
    assert "over the limit of 100" in rows[0].error and rows[1].image == b"x"


def tar_with_attacks(path: Path) -> None:
    """Good samples around members named ../x and /x, a symlink, a hard link and a FIFO."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        add(tar, "00000.png", encoded(1)[1])
        add(tar, "../escape.png", encoded(3)[1])
        add(tar, "/abs.png", encoded(3)[1])
        for name, kind, target in (("sym.png", tarfile.SYMTYPE, "/etc/passwd"), ("hard.png", tarfile.LNKTYPE, "00000.png"),
                                   ("fifo.png", tarfile.FIFOTYPE, "")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
        add(tar, "00001.png", encoded(5)[1])


def test_links_and_escaping_names_are_error_rows_and_never_copied(talkative_vlm, tmp_path):
    """Before, link members vanished from the results without an error row, and members named
    ../escape.png and /abs.png were copied into the output tar under those names."""
    from cogvlm.caption import caption_shards

    tar_with_attacks(tmp_path / "in.tar")
    writer = ShardWriter(tmp_path / "out", "wds")
    summary = caption_shards(talkative_vlm, [tmp_path / "in.tar"], writer, Columns(), batch_size=4,
                             sampling=talkative_vlm.sampling(top_k=1, max_new_tokens=4), progress=False)
    assert (summary.done, len(summary.failed), summary.shards_written) == (2, 5, 1)
    with tarfile.open(tmp_path / "out" / "in.tar") as out:
        names = out.getnames()
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in names), names
        assert all(m.isfile() for m in out.getmembers())
        errors = {n: out.extractfile(n).read().decode() for n in names if n.endswith(".error")}
    assert set(errors) == {"_/escape.error", "_/abs.error", "sym.error", "hard.error", "fifo.error"}, names
    assert "names a path outside" in errors["_/escape.error"] and "names a path outside" in errors["_/abs.error"]
    assert "is a link to /etc/passwd" in errors["sym.error"] and "is a link to 00000.png" in errors["hard.error"]
    assert "not a regular file" in errors["fifo.error"]
    assert {"00000.png", "00000.txt", "00001.png", "00001.txt"} <= set(names)


def test_parquet_paths_stay_in_the_parquet_folder(tmp_path):
    """Before, a path column could name any file (`/etc/shadow`, `../../secret.png`); now paths
    stay inside the Parquet file's folder unless --allow-local-files, links followed."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    (data / "img" / "ok.png").write_bytes(encoded(1)[1])
    (tmp_path / "outside.png").write_bytes(encoded(1)[1])
    (data / "img" / "link.png").symlink_to(tmp_path / "outside.png")
    names = ["img/ok.png", "../outside.png", str(tmp_path / "outside.png"), "img/link.png", "/dev/zero"]
    pq.write_table(pa.table({"path": names}), data / "paths.parquet")
    rows = list(samples(data / "paths.parquet", Columns()))
    assert rows[0].image == str(data / "img" / "ok.png") and rows[0].error is None
    for row, name in zip(rows[1:], names[1:]):
        assert row.image is None and f"{name} is outside {data} (--allow-local-files reads any path)" in row.error
    allowed = list(samples(data / "paths.parquet", Columns(any_path=True)))
    assert [r.error for r in allowed] == [None] * 5


def test_paths_are_read_as_regular_files_within_the_limit(tmp_path):
    from cogvlm.caption import load_sample
    from cogvlm.data.shards import Sample

    (tmp_path / "big.png").write_bytes(bytes(2000))
    assert "over the limit of 1000" in load_sample(tmp_path, Sample("a", str(tmp_path / "big.png")), max_bytes=1000)
    assert load_sample(tmp_path, Sample("z", "/dev/zero"), max_bytes=1000) == "not a file: /dev/zero"


def test_the_caption_cli_takes_the_limit_and_the_path_policy(talkative, tmp_path):
    """Through the real command: --max-image-bytes makes a sample an error row, --allow-local-files
    lets a path outside the folder through."""
    (tmp_path / "data").mkdir()
    (tmp_path / "outside.png").write_bytes(encoded(1)[1])
    (tmp_path / "data" / "small.png").write_bytes(encoded(3)[1][:500])
    pq.write_table(pa.table({"path": ["../outside.png", "small.png"]}), tmp_path / "data" / "p.parquet")
    base = [sys.executable, "-m", "cogvlm", "caption", str(tmp_path / "data" / "p.parquet"), "--model", str(talkative),
            "--max_new_tokens", "2", "--top_k", "1"]
    run = subprocess.run(base + ["--output", str(tmp_path / "o1"), "--max-image-bytes", "400"], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    errors = pq.read_table(tmp_path / "o1" / "p.parquet").column("error").to_pylist()
    assert "outside" in errors[0] and "over the limit of 400" in errors[1], errors
    run = subprocess.run(base + ["--output", str(tmp_path / "o2"), "--allow-local-files"], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stderr
    table = pq.read_table(tmp_path / "o2" / "p.parquet").to_pydict()
    assert table["error"][0] is None and table["caption"][0] is not None and "corrupt or truncated" in table["error"][1]


# ---- 10: RefCOCO pickles hold plain data of the size they are -----------------------------------

def test_a_nine_byte_pickle_is_refused_before_it_allocates(tmp_path):
    """`\\x8e` and an 8-byte length: pickle allocated the 4.4 GB the length declares before
    reading; under an address-space limit that was a MemoryError traceback."""
    path = tmp_path / "refs(unc).p"
    path.write_bytes(b"\x8e" + (4_400_000_000).to_bytes(8, "little"))
    assert path.stat().st_size == 9
    growth, out = peak_growth(
        "from cogvlm.errors import UsageError\n"
        "size = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 2**31, resource.RLIM_INFINITY))\n"
        f"try:\n    load_refs(Path({str(path)!r}))\nexcept UsageError as e:\n    print('REFUSED', e)")
    assert "REFUSED" in out and "is not a plain-data refs pickle" in out and growth < 50 * 2**20, out


@pytest.mark.parametrize("payload, message", [
    (pickle.dumps([{"ref_id": 1}], protocol=2)[:-3], "not a plain-data refs pickle"),
    (b"\x80\x02c__builtin__\neval\nq\x00.", "opcode GLOBAL at byte 2 is not plain data"),
    (pickle.dumps({"ref_id": 1}, protocol=2), "is not a RefCOCO refs list"),
    (pickle.dumps([1, 2], protocol=2), "is not a RefCOCO refs list"),
])
def test_bad_refs_pickles_are_named(tmp_path, payload, message):
    from cogvlm.eval.formats.grounding import load_refs

    (tmp_path / "refs.p").write_bytes(payload)
    with pytest.raises(UsageError, match=message):
        load_refs(tmp_path / "refs.p")


def refcoco_files(root: Path, ref: dict, instances: dict) -> list[Path]:
    (root / "refs(unc).p").write_bytes(pickle.dumps([ref], protocol=2))
    (root / "instances.json").write_text(json.dumps(instances))
    return [root / "refs(unc).p", root / "instances.json"]


GOOD_REF = {"ref_id": 1, "ann_id": 5, "image_id": 9, "split": "val", "sentences": [{"sent_id": 3, "sent": "a dog"}]}
GOOD_INSTANCES = {"images": [{"id": 9, "width": 64, "height": 48, "file_name": "x.jpg"}],
                  "annotations": [{"id": 5, "bbox": [1, 2, 3, 4]}]}


@pytest.mark.parametrize("change, message", [
    (lambda r, i: r.pop("split"), "refs(unc).p is not a RefCOCO refs list"),
    (lambda r, i: r.update(sentences=[{"sent_id": 3}]), "ref 0: no 'sent' field"),
    (lambda r, i: r.update(image_id=10), "ref 0: no 10 field"),
    (lambda r, i: r.update(sentences=[{"sent": "x"}]), "ref 0: no 'sent_id' field"),
    (lambda r, i: r.update(sentences=7), "ref 0: unexpected content (TypeError"),
    (lambda r, i: i["annotations"][0].update(bbox=[1]), "ref 0: unexpected content (TypeError"),
    (lambda r, i: i["annotations"].append(3), "annotation: unexpected content (TypeError"),
    (lambda r, i: i["images"][0].pop("id"), "image: no 'id' field"),
])
def test_crafted_refcoco_rows_are_named_errors(tmp_path, change, message):
    """KeyError, TypeError, ... out of read_refcoco used to be tracebacks; now one UsageError
    naming the file and the row."""
    from cogvlm.eval.formats.grounding import read_refcoco

    ref, instances = json.loads(json.dumps(GOOD_REF)), json.loads(json.dumps(GOOD_INSTANCES))
    assert len(read_refcoco(refcoco_files(tmp_path, ref, instances), tmp_path, None).items) == 1
    change(ref, instances)
    with pytest.raises(UsageError, match=re.escape(message)):
        read_refcoco(refcoco_files(tmp_path, ref, instances), tmp_path, None)
