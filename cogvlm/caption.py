"""`cogvlm caption PATH...`: caption every image under files and folders, in batches, resumably,
and data-parallel under `torchrun --nproc_per_node N`.

Why it is built this way:
- Nothing is ever half-written: a `.txt` caption is written to a temporary file and renamed into
  place, and records for `--output` are appended as whole lines (flushed and fsynced) to a
  per-process journal, `FILE.rank<R>.part`. Killing a run loses at most the batch in flight, and
  a rerun skips every image already done (a trailing partial journal line is ignored).
- With `--output`, the final file is only written at the end, by rank 0 after all ranks are done,
  atomically and sorted by image path: one process and N processes give the same file.
- Decoding goes through `CogVLM.generate` (batched); this module only finds, loads and records.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Sequence

from PIL import Image
from tqdm import tqdm

from .options import UsageError, add_model_flags, load_model, sampling_flags
from .generate import ContextLengthError
from .image import ImageError, load_image

if TYPE_CHECKING:
    from .api import CogVLM

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
OUTPUT_FORMATS = (".jsonl", ".csv")


def find_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files under the given folders (recursive, by extension, hidden names skipped) plus the
    files given by name, sorted: every process of a run computes the same list."""
    found: set[Path] = set()
    for given in map(Path, paths):
        if given.is_dir():
            found.update(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
                         and not p.name.startswith(".") and p.is_file())
        elif given.is_file():
            found.add(given)
        else:
            raise FileNotFoundError(f"no such file or folder: {given}")
    return sorted(found)


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """A folder the user cannot write to is their mistake to fix: one line, no traceback."""
    try:
        yield
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e} (--output FILE writes elsewhere)") from None


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename: readers (and a killed run) never see half a file.
    The temporary name is fixed per target, so a rerun that redoes the target replaces a leftover."""
    tmp = path.with_name(f".{path.name}.tmp")
    with _writing(path):
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class Sink(Protocol):
    def done(self, image: Path) -> bool: ...
    def write(self, results: Sequence[tuple[Path, str]]) -> None: ...
    def close(self) -> None: ...


class TextFiles:
    """A caption next to each image, `photo.jpg` -> `photo.txt`: the usual layout of training sets."""

    def __init__(self, images: Sequence[Path]) -> None:
        owners: dict[Path, Path] = {}
        for image in images:
            target = self.target(image)
            if target in owners:
                raise UsageError(f"{owners[target]} and {image} would both write {target}; rename one, or "
                                 f"collect the captions in one file with --output captions.jsonl")
            owners[target] = image

    @staticmethod
    def target(image: Path) -> Path:
        return image.with_suffix(".txt")

    def done(self, image: Path) -> bool:
        return self.target(image).exists()

    def write(self, results: Sequence[tuple[Path, str]]) -> None:
        for image, caption in results:
            write_atomic(self.target(image), caption + "\n")

    def close(self) -> None:
        pass


class RecordFile:
    """One JSONL or CSV file of {"image", "caption"} records, built from per-rank journals."""

    def __init__(self, output: Path, rank: int) -> None:
        if output.suffix.lower() not in OUTPUT_FORMATS:
            raise UsageError(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, not {output.name!r}")
        with _writing(output):
            output.parent.mkdir(parents=True, exist_ok=True)
        self.output = output
        self.journal = output.with_name(f"{output.name}.rank{rank}.part")
        self.records = self.read_all()
        self._file: io.BufferedWriter | None = None

    def journals(self) -> list[Path]:
        return sorted(self.output.parent.glob(f"{glob.escape(self.output.name)}.rank*.part"))

    def read_all(self) -> dict[str, str]:
        """Records of the output file and of every journal, from this run or an interrupted one."""
        records = read_output(self.output) if self.output.exists() else {}
        for journal in self.journals():
            records.update(read_journal(journal)[0])
        return records

    def done(self, image: Path) -> bool:
        return str(image) in self.records

    def write(self, results: Sequence[tuple[Path, str]]) -> None:
        lines = "".join(json.dumps({"image": str(p), "caption": c}, ensure_ascii=False) + "\n" for p, c in results)
        with _writing(self.journal):
            if self._file is None:
                if self.journal.exists():  # drop a partial last line, or the next line would extend it
                    os.truncate(self.journal, read_journal(self.journal)[1])
                self._file = open(self.journal, "ab")
            self._file.write(lines.encode())
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def merge(self) -> None:
        """Fold every journal into the output (atomically, sorted), then delete the journals."""
        records = sorted(self.read_all().items())
        if self.output.suffix.lower() == ".csv":
            text = io.StringIO()
            writer = csv.writer(text)
            writer.writerow(["image", "caption"])
            writer.writerows(records)
            write_atomic(self.output, text.getvalue())
        else:
            write_atomic(self.output, "".join(json.dumps({"image": i, "caption": c}, ensure_ascii=False) + "\n"
                                              for i, c in records))
        for journal in self.journals():
            journal.unlink()


def read_journal(path: Path) -> tuple[dict[str, str], int]:
    """The records of a journal and the byte length of its complete lines (a run killed mid-write
    can leave a partial last line: it is ignored)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return _parse_jsonl(data[:end].decode("utf-8", errors="replace"), path), end


def read_output(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".csv":
        return _parse_jsonl(text, path)
    rows = csv.DictReader(io.StringIO(text, newline=""))
    if not {"image", "caption"} <= set(rows.fieldnames or ()):
        raise UsageError(f"{path} has no image and caption columns; is it a caption file? Move it away or "
                         f"pick another --output")
    return {row["image"]: row["caption"] for row in rows}


def _parse_jsonl(text: str, path: Path) -> dict[str, str]:
    records = {}
    for n, line in enumerate(text.splitlines(), 1):
        try:
            record = json.loads(line)
            records[record["image"]] = record["caption"]
        except (json.JSONDecodeError, TypeError, KeyError):
            raise UsageError(f"{path} line {n} is not a caption record ({{\"image\", \"caption\"}}); "
                             f"fix or delete it") from None
    return records


# ---- captioning -------------------------------------------------------------------------------

@dataclass
class Summary:
    done: int = 0
    skipped: int = 0  # already done by an earlier run
    failed: list[str] = field(default_factory=list)  # why each unreadable image was skipped


def _load(path: Path) -> Image.Image | str:
    """The decoded image, or why it cannot be read (ImageError messages name the file)."""
    try:
        return load_image(path)
    except ImageError as e:
        return str(e)
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}"


def _load_batch(paths: Sequence[Path]) -> list[Image.Image | str]:
    return [_load(p) for p in paths]


def caption_images(vlm: CogVLM, images: Sequence[Path], sink: Sink, query: str = "", template: str | None = "base",
                   batch_size: int = 8, sampling: dict[str, Any] | None = None,
                   progress: bool | None = None) -> Summary:
    """Caption the images `sink` has not recorded yet, `batch_size` at a time. The next batch is
    decoded from disk in a thread while the model works on the current one."""
    todo = [p for p in images if not sink.done(p)]
    summary = Summary(skipped=len(images) - len(todo))
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]
    with ThreadPoolExecutor(1) as pool, tqdm(total=len(todo), unit="img", desc="captioning",
                                             disable=None if progress is None else not progress) as bar:
        pending = pool.submit(_load_batch, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            loaded = pending.result()
            pending = pool.submit(_load_batch, batches[i + 1]) if i + 1 < len(batches) else None
            readable = [(path, img) for path, img in zip(batch, loaded) if not isinstance(img, str)]
            for reason in (img for img in loaded if isinstance(img, str)):
                summary.failed.append(reason)
                tqdm.write(f"cogvlm caption: skipped: {reason}", file=sys.stderr)
            if readable:
                answers = vlm.generate([(img, query, None) for _, img in readable], template, **(sampling or {}))
                sink.write([(path, answer) for (path, _), answer in zip(readable, answers)])
                summary.done += len(readable)
            bar.update(len(batch))
    return summary


# ---- command line ------------------------------------------------------------------------------

def _world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; joins the gloo group when there are several."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=timedelta(hours=24))  # ranks may end far apart
    return rank, world


def _totals(summary: Summary, world: int) -> tuple[int, int, int]:
    """Counts over all ranks. The all-reduce is also the barrier before rank 0 merges."""
    counts = (summary.done, summary.skipped, len(summary.failed))
    if world == 1:
        return counts
    import torch
    import torch.distributed as dist

    total = torch.tensor(counts)
    dist.all_reduce(total)
    return tuple(total.tolist())


def cmd_caption(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, not {args.batch_size}")
    sampling = sampling_flags(args)
    images = find_images(args.paths)
    rank, world = _world()
    sink: TextFiles | RecordFile = RecordFile(args.output, rank) if args.output else TextFiles(images)
    if world > 1 and args.device is None:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    vlm = load_model(args)
    query, template = (args.query, args.template) if args.query is not None else ("", args.template or "base")
    try:
        summary = caption_images(vlm, images[rank::world], sink, query, template, args.batch_size, sampling,
                                 progress=None if rank == 0 else False)
    except ContextLengthError as e:
        raise UsageError(str(e)) from None
    finally:
        sink.close()
    done, skipped, failed = _totals(summary, world)
    if rank == 0:
        if isinstance(sink, RecordFile):
            sink.merge()
        where = f" -> {args.output}" if args.output else ""
        print(f"cogvlm caption: {done} captioned, {skipped} skipped (already done), {failed} failed "
              f"(of {len(images)} images){where}")
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def add_caption_verb(verbs: Any) -> None:
    """Register `cogvlm caption` on the top-level parser's subcommands."""
    p = verbs.add_parser("caption", help="caption every image in folders (batched, resumable; torchrun: several GPUs)",
                         description="Caption images under files and folders (recursive). Writes photo.txt next to "
                                     "photo.jpg, or one JSONL/CSV file with --output. A rerun skips images already "
                                     "done. Under torchrun --nproc_per_node N each process takes a share. "
                                     "See docs/caption.md.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders")
    add_model_flags(p)
    p.add_argument("--query", help="ask this instead of captioning (default: the base template with an empty "
                                   "query, plain captioning; with --query the model's template unless --template)")
    p.add_argument("--output", type=Path, metavar="FILE", help="write all captions to one .jsonl or .csv file "
                                                               "instead of a .txt next to each image")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images captioned together (default 8)")
    p.set_defaults(func=cmd_caption)
