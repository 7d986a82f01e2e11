"""`cogvlm caption PATH...`: caption every image under files and folders, or every sample of a
tar/Parquet dataset, in batches, resumably, and data-parallel under `torchrun --nproc_per_node N`
(Ray: caption_ray.py).

Why it is built this way:
- Nothing is ever half-written: a `.txt` caption is written to a temporary file and renamed into
  place, and records for `--output` are appended as whole lines (flushed and fsynced) to a
  per-process journal, `FILE.rank<R>.part`. Killing a run loses at most the batch in flight, and
  a rerun skips every image already done (a trailing partial journal line is ignored).
- With `--output`, the final file is only written at the end, by rank 0 after all ranks are done,
  atomically and sorted by image path: one process and N processes give the same file.
- Datasets are written one output shard per input shard, atomically (datasets.py): a rerun skips
  the shards done and redoes the rest.
- Decoding goes through `CogVLM.generate` (batched); this module only finds, loads and records.
  Images are read and decoded in a background thread, a batch or two ahead of the model.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import io
import json
import os
import queue
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Protocol, Sequence, TypeVar, Union

from PIL import Image

from .datasets import (IMAGE_COLUMNS, IMAGE_EXTENSIONS, OUTPUT_FORMATS as OUTPUT_SHARD_FORMATS, Columns, Result,
                       Sample, ShardError, ShardWriter, count_samples, expand, find_shards, is_shard, output_path,
                       parquet_columns, samples, sampling_json)
from .files import WriteError, temp_path, write_text
from .generate import ContextLengthError
from .image import ImageError, ImageInput, load_image
from .options import UsageError, add_model_flags, load_model, sampling_flags, share_items
from .progress import Progress
from .prompt import build_prompt

if TYPE_CHECKING:
    from .api import CogVLM

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
    """`files.write_text`, with a failure told as a caption user's mistake to fix."""
    try:
        write_text(path, text)
    except WriteError as e:  # it names the file already
        raise UsageError(f"{e} (--output FILE writes elsewhere)") from None


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
            file, self._file = self._file, None
            # every write is flushed: close has only a failed write's rest to flush, and that write's
            # error (a full disk) is the one to report, not this second one
            with contextlib.suppress(OSError):
                file.close()

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

Loaded = Union[Image.Image, str]  # a decoded image, or why it could not be read
T = TypeVar("T")


@dataclass
class Summary:
    """What a run did. `seconds` is wall time; `replicas` (Ray) holds [images, busy seconds] per replica."""

    done: int = 0
    skipped: int = 0  # already done by an earlier run
    failed: list[str] = field(default_factory=list)  # why each unreadable image was skipped
    tokens: int = 0  # caption tokens (the captions encoded again)
    seconds: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0
    shards_failed: list[str] = field(default_factory=list)
    replicas: dict[str, list[float]] = field(default_factory=dict)

    def postfix(self, start: float, **more: Any) -> dict[str, Any]:
        """What the progress line shows besides images/s: tokens/s and failures so far."""
        self.seconds = time.monotonic() - start
        return {"tokens/s": f"{self.tokens / max(self.seconds, 1e-9):.1f}", "failed": len(self.failed), **more}


def progress_bar(total: int | None, progress: bool | None, every: float) -> Progress:
    """A bar on a terminal, a line every `every` seconds elsewhere; none on ranks other than 0."""
    return Progress(total, "cogvlm caption", "img", enabled=progress is not False, every=every)


def say(bar: Progress, message: str) -> None:
    """A message (a skipped image) that does not break the bar; shown on every rank."""
    if bar.bar is not None:
        bar.bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def prefetch(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items` produced by a background thread at most `depth` ahead, so image reading and
    decoding overlap the model's work while memory stays bounded."""
    slots: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as e:  # handed to the consumer, which raises it
            put((end, e))

    threading.Thread(target=produce, daemon=True, name="cogvlm-caption-loader").start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def _load(source: ImageInput, name: str | Path) -> Loaded:
    """The decoded image, or why it cannot be read (ImageError messages name the file)."""
    try:
        return load_image(source)
    except ImageError as e:
        return str(e)
    except OSError as e:
        return f"cannot read {name}: {e.strerror or e}"


def load_sample(shard: Path, sample: Sample) -> Loaded:
    if sample.image is None:
        return sample.error or f"sample {sample.key} of {shard} has no image"
    loaded = _load(sample.image, sample.image if isinstance(sample.image, str) else shard)
    if isinstance(loaded, str) and isinstance(sample.image, bytes):  # name the sample, not "the given bytes"
        return f"{shard} sample {sample.key} {loaded.removeprefix('the given bytes ')}"
    return loaded


def caption_batch(vlm: CogVLM, loaded: Sequence[Loaded], query: str, template: str | None,
                  sampling: dict[str, Any]) -> tuple[list[str | None], int]:
    """Captions of the readable images in one `CogVLM.generate` call (None for the others), and
    how many tokens they are."""
    answers = iter(vlm.generate([(img, query, None) for img in loaded if not isinstance(img, str)], template,
                                **sampling))
    captions = [None if isinstance(img, str) else next(answers) for img in loaded]
    return captions, sum(len(vlm.tokenizer.encode(c)) for c in captions if c is not None)


def _count(summary: Summary, progress: Progress, loaded: Sequence[Loaded], captions: Sequence[str | None],
           tokens: int) -> None:
    for img in loaded:
        if isinstance(img, str):
            summary.failed.append(img)
            say(progress, f"cogvlm caption: skipped: {img}")
    summary.done += sum(c is not None for c in captions)
    summary.tokens += tokens


def run_meta(vlm: CogVLM, model: str, query: str, template: str | None,
             sampling: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The model, prompt and sampling columns of Parquet output: what produced the captions."""
    return (("model", str(model)), ("prompt", build_prompt(query, (), template or vlm.config.template)),
            ("sampling", sampling_json(vlm.sampling(**sampling))))


def caption_images(vlm: CogVLM, images: Sequence[Path], sink: Sink, query: str = "", template: str | None = "base",
                   batch_size: int = 8, sampling: dict[str, Any] | None = None,
                   progress: bool | None = None, log_every: float = 30.0) -> Summary:
    """Caption the images `sink` has not recorded yet, `batch_size` at a time. The next batch is
    decoded from disk in a thread while the model works on the current one."""
    todo = [p for p in images if not sink.done(p)]
    summary = Summary(skipped=len(images) - len(todo))
    bar, start = progress_bar(len(todo), progress, log_every), time.monotonic()
    batches = (todo[i:i + batch_size] for i in range(0, len(todo), batch_size))
    try:
        for batch, loaded in prefetch((b, [_load(p, p) for p in b]) for b in batches):
            captions, tokens = caption_batch(vlm, loaded, query, template, sampling or {})
            _count(summary, bar, loaded, captions, tokens)
            if any(c is not None for c in captions):
                sink.write([(path, c) for path, c in zip(batch, captions) if c is not None])
            bar.update(len(batch), **summary.postfix(start))
    finally:
        summary.seconds = time.monotonic() - start
        bar.close()
    return summary


def _shard_batches(shards: Sequence[Path], columns: Columns,
                   batch_size: int) -> Iterator[tuple[Path, list[tuple[str, Loaded]] | ShardError | None]]:
    """Per shard: (shard, batch of (key, image or why not)) ..., then (shard, None) at its end, or
    (shard, ShardError) where the shard itself is damaged."""
    for shard in shards:
        batch: list[tuple[str, Loaded]] = []
        try:
            for sample in samples(shard, columns):
                batch.append((sample.key, load_sample(shard, sample)))
                if len(batch) == batch_size:
                    yield shard, batch
                    batch = []
        except ShardError as e:
            yield shard, e
            continue
        if batch:
            yield shard, batch
        yield shard, None


def caption_shards(vlm: CogVLM, shards: Sequence[Path], writer: ShardWriter, columns: Columns = Columns(),
                   query: str = "", template: str | None = "base", batch_size: int = 8,
                   sampling: dict[str, Any] | None = None, progress: bool | None = None,
                   log_every: float = 30.0) -> Summary:
    """Caption every shard `writer` has no output for, writing each output shard when its last
    sample is done; samples are read and decoded in a thread while the model works."""
    todo = [s for s in shards if not writer.done(s)]
    summary = Summary(shards_skipped=len(shards) - len(todo))
    bar, start = progress_bar(None, progress, log_every), time.monotonic()
    results: list[Result] = []
    try:
        for shard, item in prefetch(_shard_batches(todo, columns, batch_size)):
            if isinstance(item, ShardError):
                summary.shards_failed.append(str(item))
                say(bar, f"cogvlm caption: shard not written (a rerun tries it again): {item}")
                results = []
            elif item is None:
                writer.write(shard, results)
                summary.shards_written += 1
                results = []
            else:
                keys, loaded = zip(*item)
                captions, tokens = caption_batch(vlm, loaded, query, template, sampling or {})
                _count(summary, bar, loaded, captions, tokens)
                results += [Result(k, c, img if isinstance(img, str) else None)
                            for k, c, img in zip(keys, captions, loaded)]
                finished = summary.shards_written + len(summary.shards_failed)
                bar.update(len(item), **summary.postfix(start, shard=f"{finished + 1}/{len(todo)}"))
    finally:
        summary.seconds = time.monotonic() - start
        bar.close()
    return summary


# ---- command line ------------------------------------------------------------------------------

COUNTS = ("done", "skipped", "tokens", "shards_written", "shards_skipped")


def _totals(summary: Summary, world: int) -> dict[str, int]:
    """Counts over all ranks. The all-reduce is also the barrier before rank 0 merges."""
    counts = [getattr(summary, k) for k in COUNTS] + [len(summary.failed), len(summary.shards_failed)]
    if world > 1:
        import torch
        import torch.distributed as dist

        total = torch.tensor(counts)
        dist.all_reduce(total)
        counts = total.tolist()
    return dict(zip(COUNTS + ("failed", "shards_failed"), counts))


def _report(totals: dict[str, int], summary: Summary, what: str, where: str) -> None:
    t = totals
    if what == "images":
        print(f"cogvlm caption: {t['done']} captioned, {t['skipped']} skipped (already done), {t['failed']} failed "
              f"(of {t['done'] + t['skipped'] + t['failed']} images){where}")
    else:
        print(f"cogvlm caption: {t['done']} captioned, {t['failed']} failed; shards: {t['shards_written']} written, "
              f"{t['shards_skipped']} skipped (already done), {t['shards_failed']} unreadable{where}")
    seconds = max(summary.seconds, 1e-9)
    print(f"cogvlm caption: {t['done'] / seconds:.2f} images/s, {t['tokens'] / seconds:.1f} tokens/s "
          f"in {summary.seconds:.1f} s")
    for replica, (images, busy) in sorted(summary.replicas.items()):
        print(f"cogvlm caption: replica {replica}: {int(images)} images, {images / max(busy, 1e-9):.2f} images/s "
              f"while busy")


def _mode(args: argparse.Namespace) -> None:
    """Flag checks that need no model."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, not {args.replicas}")
    if args.gpus_per_replica < 0 or args.cpus_per_replica <= 0:
        raise UsageError("--gpus-per-replica must be >= 0 and --cpus-per-replica > 0")
    if not args.caption_key or "/" in args.caption_key or args.caption_key == "error":
        raise UsageError(f"--caption-key must be a file extension such as txt or cogvlm.txt, not {args.caption_key!r}")
    if (args.ray_address or args.replicas != 1 or args.gpus_per_replica) and not args.ray:
        raise UsageError("--ray-address, --replicas and --gpus-per-replica go with --ray")


def _dataset_writer(args: argparse.Namespace, shards: Sequence[Path]) -> ShardWriter:
    if args.output is None or args.output.suffix.lower() in OUTPUT_FORMATS:
        raise UsageError("tar and Parquet shards are captioned into an output folder, one output shard per input "
                         "shard: give --output DIR")
    if args.output.exists() and not args.output.is_dir():
        raise UsageError(f"--output {args.output} is a file; give a folder")
    if args.format == "wds":
        for shard in shards:
            if shard.suffix.lower() != ".tar":
                raise UsageError(f"--format wds adds captions to webdataset tar shards; {shard} is not one "
                                 f"(use --format parquet)")
            if output_path(shard, args.output, "wds").resolve() == shard.resolve():
                raise UsageError(f"--output {args.output} would overwrite the input shard {shard}; pick another folder")
    return ShardWriter(args.output, args.format, args.caption_key)


def _dry_run(shards: Sequence[Path], writer: ShardWriter, columns: Columns) -> int:
    todo = 0
    for shard in shards:
        target = writer.target(shard)
        state = "done" if target.exists() else "redo" if temp_path(target).exists() else "todo"
        try:
            count = f"{count_samples(shard, columns)} samples"
        except Exception as e:  # a damaged shard: the run reports it too
            count = f"unreadable: {e}"
        todo += state != "done"
        print(f"{state}  {shard} -> {target}  ({count})")
    print(f"cogvlm caption: would caption {todo} of {len(shards)} shards (dry run: nothing was loaded or written)")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    _mode(args)
    sampling = sampling_flags(args)
    paths = expand(args.paths)
    dataset = [p for p in paths if is_shard(p)]
    if dataset and len(dataset) < len(paths):
        raise UsageError("give either tar/Parquet shards or images and folders, not both in one run")
    if args.ray and not dataset:
        raise UsageError("--ray captions tar or Parquet shards; caption folders of images without --ray "
                         "(or under torchrun)")
    query, template = (args.query, args.template) if args.query is not None else ("", args.template or "base")
    if dataset:
        shards = find_shards(dataset)
        writer = _dataset_writer(args, shards)
        columns = Columns(args.image_column, args.id_column)
        for shard in shards:
            if shard.suffix.lower() == ".parquet":
                try:
                    parquet_columns(shard, columns)  # a wrong --image-column stops here, before the model loads
                except ShardError:
                    pass  # a damaged file: the run reports it and goes on
        if args.dry_run:
            return _dry_run(shards, writer, columns)
        if args.ray:
            from .caption_ray import caption_on_ray

            summary = caption_on_ray(args, shards, writer, columns, query, template, sampling)
            _report(_totals(summary, 1), summary, "shards", f" -> {args.output}")
            return 0
    else:
        images = find_images(paths)
        if args.dry_run:
            records = RecordFile(args.output, 0) if args.output else TextFiles(images)
            todo = sum(not records.done(p) for p in images)
            print(f"cogvlm caption: would caption {todo} of {len(images)} images ({len(images) - todo} already done) "
                  f"-> {args.output or '.txt next to each image'} (dry run: nothing was loaded or written)")
            return 0
    rank, world = share_items(args)
    # checked before the model loads: an --output that cannot be written, .txt files that would clash
    sink = None if dataset else RecordFile(args.output, rank) if args.output else TextFiles(images)
    vlm = load_model(args)
    progress = None if rank == 0 else False
    try:
        if dataset:
            writer = replace(writer, meta=run_meta(vlm, args.model, query, template, sampling))
            summary = caption_shards(vlm, shards[rank::world], writer, columns, query, template, args.batch_size,
                                     sampling, progress, args.log_every)
        else:
            try:
                summary = caption_images(vlm, images[rank::world], sink, query, template, args.batch_size, sampling,
                                         progress, args.log_every)
            finally:
                sink.close()
    except ContextLengthError as e:
        raise UsageError(str(e)) from None
    totals = _totals(summary, world)
    if rank == 0:
        if not dataset and isinstance(sink, RecordFile):
            sink.merge()
        where = f" -> {args.output}" if args.output else ""
        _report(totals, summary, "shards" if dataset else "images", where)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def add_caption_verb(verbs: Any) -> None:
    """Register `cogvlm caption` on the top-level parser's subcommands."""
    p = verbs.add_parser("caption", help="caption folders of images or tar/Parquet datasets (batched, resumable; "
                                         "torchrun or Ray for several GPUs)",
                         description="Caption images under files and folders (recursive): writes photo.txt next to "
                                     "photo.jpg, or one JSONL/CSV file with --output. Or caption datasets of "
                                     "webdataset .tar and .parquet shards (brace patterns such as "
                                     "'shards/{00000..00127}.tar' work): one output shard per input shard in "
                                     "--output DIR. A rerun skips work already done. Under torchrun "
                                     "--nproc_per_node N each process takes a share; --ray runs on a Ray cluster. "
                                     "See docs/caption.md.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders, or .tar / .parquet shards")
    add_model_flags(p)
    p.add_argument("--query", help="ask this instead of captioning (default: the base template with an empty "
                                   "query, plain captioning; with --query the model's template unless --template)")
    p.add_argument("--output", type=Path, metavar="FILE_OR_DIR",
                   help="images: write all captions to one .jsonl or .csv file instead of a .txt next to each image; "
                        "shards: the output folder (required)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images captioned together (default 8)")
    p.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                   help="off a terminal, a progress line every SECONDS (default 30)")
    p.add_argument("--dry-run", action="store_true", help="list what would be captioned and where, then stop")
    d = p.add_argument_group("datasets (tar and Parquet shards)")
    d.add_argument("--format", choices=OUTPUT_SHARD_FORMATS, default="parquet",
                   help="output shards: parquet (id, caption, model, prompt, sampling, error) or wds (each input "
                        "tar again, with a caption member added to every sample) (default parquet)")
    d.add_argument("--caption-key", default="txt", metavar="EXT",
                   help="--format wds: the caption member's extension (default txt; it replaces an existing one "
                        "in the output, so pick e.g. cogvlm.txt to keep img2dataset's alt text)")
    d.add_argument("--image-column", metavar="NAME",
                   help=f"Parquet: the column of image bytes or paths/URLs (default: the first of "
                        f"{', '.join(IMAGE_COLUMNS)})")
    d.add_argument("--id-column", metavar="NAME", help="Parquet: the sample id column (default: key or id, else "
                                                      "the row number)")
    r = p.add_argument_group("Ray (pip install 'cogvlm[ray]')")
    r.add_argument("--ray", action="store_true", help="caption shards with Ray Data on an actor pool of model replicas")
    r.add_argument("--ray-address", metavar="ADDR", help="the cluster to join (default: start a local Ray instance)")
    r.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas (default 1)")
    r.add_argument("--gpus-per-replica", type=float, default=0, metavar="G", help="GPUs per replica (default 0: CPU)")
    r.add_argument("--cpus-per-replica", type=float, default=1, metavar="C",
                   help="CPUs per replica (default 1; also its torch threads)")
    p.set_defaults(func=cmd_caption)
