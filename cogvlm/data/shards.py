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
- Small files can describe huge data (a sparse tar member, a zstd page of zeros): sizes are
  checked where the file declares them (a member's header, a column chunk's metadata) before
  anything is read, against `Columns.max_bytes`, and a sample over it is an error row. Tar
  members that are links, or whose names leave the folder (`../x`, `/x`), are error rows too and
  are never copied into an output tar; Parquet paths stay inside the Parquet file's folder
  unless `Columns.any_path` (`--allow-local-files`).
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
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Sequence

from ..errors import ShardError, UsageError, WriteError
from ..files import atomic_path, printable
from ..image import MAX_IMAGE_BYTES

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
TEXT_BYTES = 2**20  # what a sample's text members (json, txt) may add to its image's bytes


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
    """How shards are read: which Parquet columns hold the image and the sample id (None: find
    them by name), the largest image or clip file (`--max-image-bytes`, `--max-video-bytes` for a
    video model; a sample's members together may add TEXT_BYTES), whether Parquet paths may name
    files outside the Parquet file's folder, and whether the samples are video clips (tar members
    by VIDEO_EXTENSIONS, columns by VIDEO_COLUMNS)."""

    image: str | None = None
    id: str | None = None
    max_bytes: int = MAX_IMAGE_BYTES
    any_path: bool = False
    video: bool = False

    @property
    def extensions(self) -> frozenset[str]:
        return VIDEO_EXTENSIONS if self.video else IMAGE_EXTENSIONS

    @property
    def media(self) -> str:
        return "video" if self.video else "image"

    @property
    def flag(self) -> str:
        """The flag that sets `max_bytes`, for the error rows."""
        return f"--max-{self.media}-bytes"


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

def tar_groups(path: Path, max_bytes: int = MAX_IMAGE_BYTES, flag: str = "--max-image-bytes",
               ) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes]], list[str]]]:
    """(key, members with their bytes, why the sample cannot be used) per sample, in file order,
    streaming. Only regular files with safe names are read, and only within `max_bytes` each (and
    TEXT_BYTES more for a sample): sizes are checked on the headers first, since a 10 kB tar can
    declare a 4 GB sparse member. The others are named in the sample's problems and skipped unread."""
    key, members, problems, size = None, [], [], 0
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            if info.isdir():
                continue
            name = _key(info)
            if name != key and (members or problems):
                yield key, members, problems
                members, problems, size = [], [], 0
            key = name
            problem = _member_problem(info)
            if problem is None and (info.size > max_bytes or size + info.size > max_bytes + TEXT_BYTES):
                problem = (f"member {printable(info.name)} is {info.size} bytes, over the limit of {max_bytes} "
                           f"({flag})" if info.size > max_bytes else
                           f"its members are over {max_bytes + TEXT_BYTES} bytes together ({flag})")
            if problem is None:
                members.append((info, tar.extractfile(info).read()))
                size += info.size
            else:
                problems.append(problem)
    if members or problems:
        yield key, members, problems


def _key(info: tarfile.TarInfo) -> str:
    match = _MEMBER.match(info.name)
    return match.group(1) if match else info.name


def _member_problem(info: tarfile.TarInfo) -> str | None:
    """Why a member is not read: a link (its target could be anything), a device or FIFO, or a
    name that would leave the folder it is extracted to (tar's path traversal)."""
    parts = PurePosixPath(info.name).parts
    if info.name.startswith("/") or ".." in parts:
        return f"member {printable(info.name)} names a path outside the shard's folder"
    if info.issym() or info.islnk():
        return f"member {printable(info.name)} is a link to {printable(info.linkname)}; links are not read"
    if not info.isfile():
        return f"member {printable(info.name)} is not a regular file"
    return None


def _safe_key(key: str) -> str:
    """`key` as a member name inside the output tar: no absolute path, no `..`."""
    return "/".join(part if part not in ("", ".", "..") else "_" for part in key.split("/"))


def _ext(info: tarfile.TarInfo) -> str:
    match = _MEMBER.match(info.name)
    return match.group(2) if match else ""


def tar_samples(path: Path, columns: Columns = Columns()) -> Iterator[Sample]:
    for key, members, problems in tar_groups(path, columns.max_bytes, columns.flag):
        shown = printable(key)
        images = [data for info, data in members if f".{_ext(info).lower()}" in columns.extensions]
        if problems:
            yield Sample(shown, None, f"sample {shown} of {path}: {'; '.join(problems)}")
        elif images:
            yield Sample(shown, images[0])
        else:
            found = ", ".join(f".{printable(_ext(info))}" for info, _ in members)
            yield Sample(shown, None, f"sample {shown} of {path} has no {columns.media} (members: {found})")


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


def parquet_samples(path: Path, columns: Columns, rows_per_read: int = 16) -> Iterator[Sample]:
    """Bytes columns are images; string columns are paths (relative ones to the file's folder) or
    URLs; Hugging Face's {"bytes", "path"} structs are either. Row group by row group, each
    checked on its metadata first (`_declared_problem`); the image column is read as dictionary
    indices where it is dictionary-encoded (a repeated value stays one value), and a cell over
    `max_bytes` is an error row, never a Python object."""
    pq = _pyarrow().parquet

    image, ident = parquet_columns(path, columns)
    file = pq.ParquetFile(path, read_dictionary=[image])
    row = 0
    for group in range(file.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        problem = _declared_problem(file.metadata.row_group(group), image, columns.max_bytes, columns.flag)
        if problem or _declared_problem(file.metadata.row_group(group), ident, TEXT_BYTES, columns.flag):
            for n in range(row, row + rows):
                yield Sample(str(n), None, f"row {n} of {path}: {problem or f'its {ident} column is too large'}")
            row += rows
            continue
        wanted = [image] + ([ident] if ident else [])
        for batch in file.iter_batches(batch_size=rows_per_read, row_groups=[group], columns=wanted):
            ids = batch.column(ident).to_pylist() if ident else range(row, row + batch.num_rows)
            for key, value in zip(ids, _cells(batch.column(image), columns.max_bytes)):
                yield _sample(path, str(key), value, columns)
            row += batch.num_rows


def _declared_problem(group: Any, column: str | None, limit: int, flag: str) -> str | None:
    """Why a row group's column is too large to read, from its metadata: the uncompressed bytes of
    the column's chunks (a 33 kB file can hold a 4 GB value of zeros) over `limit` per row."""
    if column is None:
        return None
    declared = sum(group.column(i).total_uncompressed_size for i in range(group.num_columns)
                   if group.column(i).path_in_schema.split(".")[0] == column)
    if declared > limit * max(group.num_rows, 1):
        return (f"the {column} column of its row group holds {declared} bytes for {group.num_rows} rows, over the "
                f"limit of {limit} per row ({flag})")
    return None


def _cells(array: Any, limit: int) -> Iterator[Any]:
    """The Python values of an image column, a value over `limit` bytes replaced by why it is
    skipped: sizes come from Arrow's offsets, so no such value is ever copied."""
    pa = _pyarrow()
    import pyarrow.compute as compute
    if pa.types.is_struct(array.type):  # Hugging Face's {"bytes", "path"}
        fields = [array.field(name) for name in ("bytes", "path") if array.type.get_field_index(name) >= 0]
    else:
        fields = [array]
    sizes = [0] * len(array)
    for field in fields:
        if pa.types.is_dictionary(field.type):
            lengths = compute.take(compute.binary_length(field.dictionary), field.indices).to_pylist()
        elif pa.types.is_binary(field.type) or pa.types.is_string(field.type) or pa.types.is_large_binary(field.type):
            lengths = compute.binary_length(field).to_pylist()
        else:
            continue
        sizes = [a + (b or 0) for a, b in zip(sizes, lengths)]
    for i, size in enumerate(sizes):
        if size > limit:
            yield _TooLarge(size, limit)
        else:
            value = array[i].as_py()
            yield value.get("bytes") or value.get("path") if isinstance(value, dict) else value


@dataclass(frozen=True)
class _TooLarge:
    size: int
    limit: int


def _sample(path: Path, key: str, value: Any, columns: Columns) -> Sample:
    """One row's Sample: bytes, a URL, or a path that must stay inside `path`'s folder (unless
    `columns.any_path`): a table's path column is data, and may come from anyone."""
    if isinstance(value, _TooLarge):
        return Sample(key, None, f"row {key} of {path}: its {columns.media} is {value.size} bytes, over the limit "
                                 f"of {value.limit} ({columns.flag})")
    if not value:
        return Sample(key, None, f"row {key} of {path} has no {columns.media}")
    if isinstance(value, str) and "://" not in value:
        local = path.parent / value
        if not columns.any_path and not _inside(local, path.parent):
            return Sample(key, None, f"row {key} of {path}: {printable(value)} is outside {path.parent} "
                                     f"(--allow-local-files reads any path)")
        value = str(local)
    return Sample(key, value)


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is in `folder`, links followed (a link in the folder may point anywhere)."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except (OSError, ValueError, RuntimeError):  # a link loop, a NUL byte
        return False


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
    return sum(1 for _ in tar_groups(shard, columns.max_bytes))


# ---- writing -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardWriter:
    """Writes one output shard per input shard, atomically. `meta` fills the model, prompt and
    sampling columns of Parquet output."""

    folder: Path
    fmt: str = "parquet"
    caption_key: str = "txt"
    meta: tuple[tuple[str, str], ...] = ()
    max_bytes: int = MAX_IMAGE_BYTES  # as the shards were read (Columns.max_bytes)

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
                    _write_tar(shard, results, tmp, self.caption_key, self.max_bytes)
                else:
                    _write_parquet(results, dict(self.meta), tmp)
        except OSError as e:
            raise WriteError(f"cannot write {target}: {e.strerror or e}") from None
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


def _write_tar(shard: Path, results: Sequence[Result], path: Path, caption_key: str, max_bytes: int) -> None:
    """The input shard again, each sample followed by `key.<caption_key>` (or `key.error`). A member
    the caption replaces (img2dataset's alt-text `.txt`) is left out, and so is every member
    `tar_groups` did not read (links, `../` names, sizes over the limit: the error says so); the
    input is not touched."""
    with open(path, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as out:
            groups = tar_groups(shard, max_bytes)
            for (key, members, _), result in zip(groups, results):
                if result.key != printable(key):
                    raise RuntimeError(f"{shard} changed while it was captioned (sample {key} != {result.key})")
                for info, data in members:
                    if _ext(info) != caption_key:
                        out.addfile(info, io.BytesIO(data))
                ext, text = (caption_key, result.caption) if result.error is None else ("error", result.error)
                data = text.encode()
                info = tarfile.TarInfo(f"{_safe_key(key)}.{ext}")
                info.size, info.mode = len(data), 0o644
                info.mtime = members[0][0].mtime if members else 0
                out.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())


def sampling_json(params: Any) -> str:
    """The sampling settings that were used, for the `sampling` column."""
    from dataclasses import asdict

    return json.dumps(asdict(params), sort_keys=True)
