"""Image datasets in shards, as img2dataset writes them: webdataset tar files and Parquet tables
(image bytes, or paths/URLs). Read and written one shard at a time, for `cogvlm caption` on one
machine and on Ray.

Why it is built this way:
- A shard is the unit of work and of output: `DIR/<name>.parquet` (or `DIR/<name>.tar`) appears,
  by rename of `DIR/.<name>.tmp`, only once every sample of its input shard has a caption or an
  error. A rerun skips the shards whose output exists and redoes the others from the start, so
  a killed run never leaves half a shard or a sample twice.
- Samples carry encoded bytes or a path/URL, never decoded pixels: decoding happens next to the
  model (a thread on one machine, the replica on Ray), so what moves is what is stored on disk.
- Only the standard `tarfile` and `pyarrow` read and write. webdataset's conventions hold: a
  sample is the run of consecutive members that share the name up to the first dot of the file
  name (the key); the rest of the name is the member's extension.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from ..errors import ShardError, UsageError
from ..files import atomic_path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".webm", ".mkv", ".mov", ".avi"})  # the containers cogvlm.video reads
SHARD_SUFFIXES = (".tar", ".parquet")
OUTPUT_FORMATS = ("parquet", "wds")
# --image-column's default: the first of these a table has (img2dataset, Hugging Face datasets, plain tables)
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes", "path", "image_path", "file",
                 "url", "image_url")
# --image-column's default for a video model's datasets
VIDEO_COLUMNS = ("video", "mp4", "webm", "mkv", "mov", "avi", "video_bytes", "bytes", "path", "video_path", "file",
                 "url", "video_url")
ID_COLUMNS = ("key", "id")
RESULT_COLUMNS = ("id", "caption", "model", "prompt", "sampling", "error")
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's key.ext split


@dataclass
class Sample:
    """One image (or clip) of a shard: encoded bytes or a path/URL (None when missing: `error` says why)."""

    key: str
    image: bytes | str | None
    error: str | None = None


@dataclass
class Result:
    key: str
    caption: str | None
    error: str | None = None


@dataclass(frozen=True)
class Columns:
    """Which Parquet columns hold the image and the sample id (None: find them by name), and
    whether the samples are video clips (tar members by VIDEO_EXTENSIONS, columns by VIDEO_COLUMNS)."""

    image: str | None = None
    id: str | None = None
    video: bool = False

    @property
    def extensions(self) -> frozenset[str]:
        return VIDEO_EXTENSIONS if self.video else IMAGE_EXTENSIONS

    @property
    def media(self) -> str:
        return "video" if self.video else "image"


def is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def expand(paths: Iterable[str]) -> list[str]:
    """Brace patterns as webdataset writes them, `shards/{00000..00127}.tar`, expanded in order."""
    out: list[str] = []
    for path in paths:
        if "{" not in path:
            out.append(path)
            continue
        try:
            from braceexpand import UnbalancedBracesError, braceexpand
        except ImportError:
            raise ImportError("brace patterns need the datasets extra: pip install 'cogvlm[datasets]'") from None
        try:
            out.extend(braceexpand(path))
        except UnbalancedBracesError:
            raise UsageError(f"unbalanced braces in {path!r}") from None
    return out


def find_shards(paths: Sequence[str]) -> list[Path]:
    """The input shards, checked to exist and to have distinct names (each names its output)."""
    shards = [Path(p) for p in paths]
    owners: dict[str, Path] = {}
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"no such shard: {shard}")
        if shard.stem in owners:
            raise UsageError(f"{owners[shard.stem]} and {shard} would both write output shard {shard.stem}; "
                             f"caption them in separate runs with separate --output folders")
        owners[shard.stem] = shard
    return shards


def output_path(shard: Path, folder: Path, fmt: str) -> Path:
    return folder / f"{shard.stem}.{'tar' if fmt == 'wds' else 'parquet'}"


# ---- reading -----------------------------------------------------------------------------------

def tar_groups(path: Path) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]]]]:
    """(key, members with their bytes) per sample, in file order, streaming."""
    key, members = None, []
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            match = _MEMBER.match(info.name)
            name = match.group(1) if match else info.name
            if name != key and members:
                yield key, members
                members = []
            key = name
            members.append((info, tar.extractfile(info).read()))
    if members:
        yield key, members


def _ext(info: tarfile.TarInfo) -> str:
    match = _MEMBER.match(info.name)
    return match.group(2) if match else ""


def tar_samples(path: Path, columns: Columns = Columns()) -> Iterator[Sample]:
    for key, members in tar_groups(path):
        images = [data for info, data in members if f".{_ext(info).lower()}" in columns.extensions]
        if images:
            yield Sample(key, images[0])
        else:
            found = ", ".join(f".{_ext(info)}" for info, _ in members)
            yield Sample(key, None, f"sample {key} of {path} has no {columns.media} (members: {found})")


def parquet_columns(path: Path, columns: Columns) -> tuple[str, str | None]:
    """(image column, id column or None for row numbers) of one file, checked against its schema."""
    pq = _pyarrow().parquet

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        raise ShardError(f"{path} is not a Parquet file pyarrow can read: {e}") from None
    defaults = VIDEO_COLUMNS if columns.video else IMAGE_COLUMNS
    image = columns.image or next((c for c in defaults if c in names), None)
    if image not in names:
        what = f"column {image!r}" if image else f"{columns.media} column"
        raise UsageError(f"{path} has no {what}; its columns are "
                         f"{', '.join(names)} (--image-column NAME picks one)")
    ident = columns.id or next((c for c in ID_COLUMNS if c in names), None)
    if columns.id and ident not in names:
        raise UsageError(f"{path} has no column {ident!r}; its columns are {', '.join(names)}")
    return image, ident


def parquet_samples(path: Path, columns: Columns, rows_per_read: int = 256) -> Iterator[Sample]:
    """Bytes columns are images; string columns are paths (relative ones to the file's folder) or
    URLs; Hugging Face's {"bytes", "path"} structs are either."""
    import pyarrow.parquet as pq

    image, ident = parquet_columns(path, columns)
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_read, columns=[image] + ([ident] if ident else [])):
        ids = batch.column(ident).to_pylist() if ident else range(row, row + batch.num_rows)
        for key, value in zip(ids, batch.column(image).to_pylist()):
            if isinstance(value, dict):
                value = value.get("bytes") or value.get("path")
            if isinstance(value, str) and "://" not in value:
                value = str(path.parent / value)
            yield Sample(str(key), value, None if value else f"row {key} of {path} has no {columns.media}")
        row += batch.num_rows


def samples(shard: Path, columns: Columns) -> Iterator[Sample]:
    """The samples of a shard, in order; raises `ShardError` where the shard itself is damaged."""
    if shard.suffix.lower() == ".parquet":
        reader, damaged = parquet_samples(shard, columns), (OSError, _pyarrow().ArrowException)
    else:
        reader, damaged = tar_samples(shard, columns), (OSError, EOFError, tarfile.TarError)
    try:
        yield from reader
    except damaged as e:
        raise ShardError(f"{shard} cannot be read: {e}") from None


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule, for callers)
    except ImportError:
        raise ImportError("Parquet needs pyarrow: pip install 'cogvlm[datasets]'") from None
    return pyarrow


def count_samples(shard: Path, columns: Columns) -> int:
    """For --dry-run: Parquet from its footer, tar by walking the headers."""
    if shard.suffix.lower() == ".parquet":
        return _pyarrow().parquet.ParquetFile(shard).metadata.num_rows
    return sum(1 for _ in tar_groups(shard))


# ---- writing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardWriter:
    """Writes one output shard per input shard, atomically. `meta` fills the model, prompt and
    sampling columns of Parquet output."""

    folder: Path
    fmt: str = "parquet"
    caption_key: str = "txt"
    meta: tuple[tuple[str, str], ...] = ()

    def target(self, shard: Path) -> Path:
        return output_path(shard, self.folder, self.fmt)

    def done(self, shard: Path) -> bool:
        return self.target(shard).exists()

    def write(self, shard: Path, results: Sequence[Result]) -> Path:
        target = self.target(shard)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                if self.fmt == "wds":
                    _write_tar(shard, results, tmp, self.caption_key)
                else:
                    _write_parquet(results, dict(self.meta), tmp)
        except OSError as e:
            raise UsageError(f"cannot write {target}: {e.strerror or e}") from None
        return target


def _write_parquet(results: Sequence[Result], meta: dict[str, str], path: Path) -> None:
    pa = _pyarrow()

    n = len(results)
    table = pa.table({"id": [r.key for r in results], "caption": [r.caption for r in results],
                      **{k: [meta.get(k, "")] * n for k in ("model", "prompt", "sampling")},
                      "error": [r.error for r in results]},
                     schema=pa.schema([(c, pa.string()) for c in RESULT_COLUMNS]))
    with open(path, "wb") as f:
        pa.parquet.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())


def _write_tar(shard: Path, results: Sequence[Result], path: Path, caption_key: str) -> None:
    """The input shard again, each sample followed by `key.<caption_key>` (or `key.error`). A member
    the caption replaces (img2dataset's alt-text `.txt`) is left out; the input is not touched."""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as out:
            groups = tar_groups(shard)
            for (key, members), result in zip(groups, results):
                if result.key != key:
                    raise RuntimeError(f"{shard} changed while it was captioned (sample {key} != {result.key})")
                for info, data in members:
                    if _ext(info) != caption_key:
                        out.addfile(info, io.BytesIO(data))
                ext, text = (caption_key, result.caption) if result.error is None else ("error", result.error)
                data = text.encode()
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), members[0][0].mtime, 0o644
                out.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())


def sampling_json(params: Any) -> str:
    """The sampling settings that were used, for the `sampling` column."""
    from dataclasses import asdict

    return json.dumps(asdict(params), sort_keys=True)
