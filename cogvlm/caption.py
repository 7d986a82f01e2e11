"""The captioning job behind `cogvlm caption PATH...` (cli/caption.py): caption every image under
files and folders, or every sample of a tar/Parquet dataset, in batches, resumably, and
data-parallel under `torchrun --nproc_per_node N` (Ray: cli/caption_ray.py).

Why it is built this way:
- Nothing is ever half-written: a `.txt` caption is written to a temporary file and renamed into
  place, and records for `--output` are appended as whole lines (flushed and fsynced) to a
  per-process journal (`jobs.Journal`), `FILE.rank<R>.part`. Killing a run loses at most the
  batch in flight, and a rerun skips every image already done (a trailing partial journal line
  is ignored).
- With `--output`, the final file is only written at the end, by rank 0 after all ranks are done,
  atomically and sorted by image path: one process and N processes give the same file.
- Datasets are written one output shard per input shard, atomically (data/shards.py): a rerun skips
  the shards done and redoes the rest.
- Decoding goes through `CogVLM.generate` (batched); this module only finds, loads and records.
  A background thread gathers the next batches, a batch or two ahead of the model, and a pool of
  decoder threads reads and decodes their images or clips (PyAV and Pillow let go of the GIL
  while they decode), so the model waits on the decoders only when they cannot keep up:
  `Summary.waited` says how long.
- Video models caption clips (docs/video.md): folders by VIDEO_EXTENSIONS, tar members and Parquet
  columns likewise; each clip is sampled by the rule of the template it is captioned with.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import queue
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar, Union

import torch
from PIL import Image

from .data.shards import (IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Columns, Result, Sample, ShardError, ShardWriter, samples,
                          sampling_json)
from .errors import ImageError, UsageError, VideoError, WriteError
from .files import printable, write_text
from .generate import SamplingParams
from .image import MAX_IMAGE_BYTES, ImageInput, TowerFrames, load_image
from .jobs import Journal, parse_jsonl, read_journal
from .progress import Progress
from .prompt import build_prompt
from .video import VideoLimits, load_video, strategy_for

if TYPE_CHECKING:
    from .api import CogVLM
    from .config import CogVLMConfig

OUTPUT_FORMATS = (".jsonl", ".csv")
DECODERS = min(8, os.cpu_count() or 1)  # decoder threads: a clip takes a core for about a second


def find_files(paths: Iterable[str | Path], extensions: Iterable[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Files with one of `extensions` under the given folders (recursive, hidden names skipped)
    plus the files given by name, sorted: every process of a run computes the same list."""
    found: set[Path] = set()
    extensions = frozenset(extensions)
    for given in map(Path, paths):
        if given.is_dir():
            found.update(p for p in given.rglob("*") if p.suffix.lower() in extensions
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
    except WriteError as e:  # it names the file already
        raise WriteError(f"{e} (--output FILE writes elsewhere)") from None
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e} (--output FILE writes elsewhere)") from None


def write_atomic(path: Path, text: str) -> None:
    """`files.write_text`, with a failure told as a caption user's mistake to fix."""
    try:
        write_text(path, text)
    except WriteError as e:  # it names the file already
        raise WriteError(f"{e} (--output FILE writes elsewhere)") from None


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
    """One JSONL or CSV file of {"image", "caption"} records ({"video", "caption"} for clips),
    built from per-rank journals."""

    def __init__(self, output: Path, rank: int, field: str = "image") -> None:
        if output.suffix.lower() not in OUTPUT_FORMATS:
            raise UsageError(f"--output must end in {' or '.join(OUTPUT_FORMATS)}, not {output.name!r}")
        with _writing(output):
            output.parent.mkdir(parents=True, exist_ok=True)
        self.output, self.field = output, field
        self.journal = output.with_name(f"{output.name}.rank{rank}.part")
        self._journal = Journal(self.journal, record_name(field))
        self.records = self.read_all()

    def journals(self) -> list[Path]:
        return sorted(self.output.parent.glob(f"{glob.escape(self.output.name)}.rank*.part"))

    def read_all(self) -> dict[str, str]:
        """Records of the output file and of every journal, from this run or an interrupted one."""
        records = read_output(self.output, self.field) if self.output.exists() else {}
        for journal in self.journals():
            records.update(_captions(read_journal(journal, record_name(self.field))[0], journal, self.field))
        return records

    def done(self, image: Path) -> bool:
        return printable(str(image)) in self.records

    def write(self, results: Sequence[tuple[Path, str]]) -> None:
        """Records name images as `printable` text: a non-UTF-8 file name as \\xNN escapes."""
        with _writing(self.journal):
            self._journal.write({self.field: printable(str(p)), "caption": c} for p, c in results)

    def close(self) -> None:
        self._journal.close()

    def merge(self) -> None:
        """Fold every journal into the output (atomically, sorted), then delete the journals."""
        records = sorted(self.read_all().items())
        if self.output.suffix.lower() == ".csv":
            text = io.StringIO()
            writer = csv.writer(text)
            writer.writerow([self.field, "caption"])
            writer.writerows(records)
            write_atomic(self.output, text.getvalue())
        else:
            write_atomic(self.output, "".join(json.dumps({self.field: i, "caption": c}, ensure_ascii=False) + "\n"
                                              for i, c in records))
        for journal in self.journals():
            journal.unlink()


def record_name(field: str = "image") -> str:
    return f'caption record ({{"{field}", "caption"}})'


def read_output(path: Path, field: str = "image") -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() != ".csv":
        return _captions(parse_jsonl(text, path, record_name(field)), path, field)
    rows = csv.DictReader(io.StringIO(text, newline=""))
    if not {field, "caption"} <= set(rows.fieldnames or ()):
        raise UsageError(f"{path} has no {field} and caption columns; is it a caption file? Move it away or "
                         f"pick another --output")
    return {row[field]: row["caption"] for row in rows}


def _captions(records: list[dict[str, Any]], path: Path, field: str) -> dict[str, str]:
    try:
        return {r[field]: r["caption"] for r in records}
    except (KeyError, TypeError):
        n = next(n for n, r in enumerate(records, 1) if not (field in r and "caption" in r))
        raise UsageError(f"{path} line {n} is not a {record_name(field)}; fix or delete it") from None


# ---- captioning -------------------------------------------------------------------------------

# an image, a clip (uint8 (3, T, H, W), or prepared for the tower), or why not
Loaded = Union[Image.Image, torch.Tensor, TowerFrames, str]
T = TypeVar("T")


@dataclass(frozen=True)
class Media:
    """What a run captions: images, or video clips sampled by `strategy` (the rule paired with the
    template, docs/video.md) within `limits`, and with `frame_size` (a model's tower size)
    preprocessed for it where they are decoded (`TowerFrames`)."""

    video: bool = False
    strategy: str = "chat"
    limits: VideoLimits = VideoLimits()
    frame_size: int | None = None

    @property
    def extensions(self) -> frozenset[str]:
        return VIDEO_EXTENSIONS if self.video else IMAGE_EXTENSIONS

    @property
    def field(self) -> str:
        """The key of a record's file name in --output FILE: image or video."""
        return "video" if self.video else "image"

    def for_model(self, template: str, config: CogVLMConfig) -> Media:
        """Clips sampled by `template`'s rule and prepared for `config`'s tower."""
        if not self.video:
            return self
        return replace(self, strategy=strategy_for(template), frame_size=config.vision.image_size)

    def load(self, source: ImageInput, max_bytes: int | None = None) -> Image.Image | torch.Tensor | TowerFrames:
        """`max_bytes` (a shard's limit, Columns.max_bytes) caps the file further than `limits`."""
        if self.video:
            limits = self.limits if max_bytes is None else replace(
                self.limits, max_bytes=min(self.limits.max_bytes, max_bytes))
            clip = load_video(source, self.strategy, limits=limits)  # type: ignore[arg-type]
            return clip if self.frame_size is None else TowerFrames.of(clip, self.frame_size)
        return load_image(source, max_bytes=max_bytes)


@dataclass
class Summary:
    """What a run did. `seconds` is wall time; `waited` the part of it the model spent waiting for
    decoded inputs; `replicas` (Ray) holds [images, busy seconds] per replica."""

    done: int = 0
    skipped: int = 0  # already done by an earlier run
    failed: list[str] = field(default_factory=list)  # why each unreadable image was skipped
    tokens: int = 0  # caption tokens (the captions encoded again)
    seconds: float = 0.0
    waited: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0
    shards_failed: list[str] = field(default_factory=list)
    replicas: dict[str, list[float]] = field(default_factory=dict)

    def postfix(self, start: float, **more: Any) -> dict[str, Any]:
        """What the progress line shows besides images/s: tokens/s and failures so far."""
        self.seconds = time.monotonic() - start
        return {"tokens/s": f"{self.tokens / max(self.seconds, 1e-9):.1f}", "failed": len(self.failed), **more}


def progress_bar(total: int | None, progress: bool | None, every: float, unit: str = "img") -> Progress:
    """A bar on a terminal, a line every `every` seconds elsewhere; none on ranks other than 0."""
    return Progress(total, "cogvlm caption", unit, enabled=progress is not False, every=every)


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


@contextmanager
def decoder_pool(workers: int) -> Iterator[Callable[..., Future]]:
    """`submit(fn, *args)` running on `workers` threads; what is still queued when the run ends
    (an error, a kill) is dropped, not decoded."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="cogvlm-decode")
    try:
        yield pool.submit
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Waiting:
    """Adds to `summary.waited` the time the model's thread spends waiting for its inputs."""

    def __init__(self, summary: Summary) -> None:
        self.summary = summary

    def next(self, items: Iterator[T]) -> T | None:
        start = time.monotonic()
        try:
            return next(items, None)
        finally:
            self.summary.waited += time.monotonic() - start

    def results(self, futures: Sequence[Future]) -> list[Any]:
        start = time.monotonic()
        try:
            return [f.result() for f in futures]
        finally:
            self.summary.waited += time.monotonic() - start


@contextmanager
def decoded_batches(items: Sequence[T], batch_size: int, load: Callable[[T], Any], decoders: int = DECODERS,
                    wait: Waiting | None = None) -> Iterator[Iterator[tuple[list[T], list[Any]]]]:
    """`items` in batches of `batch_size`, each with what `load` made of its items (a decoded
    image or clip, or why not), loaded by `decoders` threads a batch or two ahead of the consumer
    (the model), so that it waits on the decoders only when they cannot keep up (`wait` adds up
    that time). The caption job and the video evaluation share it."""
    wait = wait or Waiting(Summary())
    with decoder_pool(decoders) as submit:
        pending = prefetch((b, [submit(load, x) for x in b])
                           for b in (list(items[i:i + batch_size]) for i in range(0, len(items), batch_size)))

        def batches() -> Iterator[tuple[list[T], list[Any]]]:
            while (item := wait.next(pending)) is not None:
                batch, futures = item
                yield batch, wait.results(futures)

        yield batches()


def load_media(source: ImageInput, name: str | Path, media: Media = Media(), max_bytes: int | None = None) -> Loaded:
    """The decoded image or clip, or why it cannot be read (the messages name the file)."""
    try:
        return media.load(source, max_bytes)
    except (ImageError, VideoError) as e:
        return str(e)
    except OSError as e:
        return f"cannot read {name}: {e.strerror or e}"


def load_sample(shard: Path, sample: Sample, media: Media = Media(), max_bytes: int = MAX_IMAGE_BYTES) -> Loaded:
    """A sample's image or clip, or why not; a path or URL is read up to `max_bytes` (Columns.max_bytes)."""
    if sample.image is None:
        return sample.error or f"sample {sample.key} of {shard} has no {media.field}"
    loaded = load_media(sample.image, sample.image if isinstance(sample.image, str) else shard, media, max_bytes)
    if isinstance(loaded, str) and isinstance(sample.image, bytes):  # name the sample, not "the given bytes"
        return f"{shard} sample {sample.key} {loaded.removeprefix('the given bytes ')}"
    return loaded


def caption_batch(vlm: CogVLM, loaded: Sequence[Loaded], query: str, template: str | None,
                  sampling: SamplingParams | None = None) -> tuple[list[str | None], int]:
    """Captions of the readable images or clips (uint8 (3, T, H, W) or `TowerFrames`) in one
    `CogVLM.generate` call (None for the others), and how many tokens they are. `sampling` None:
    the model's defaults."""
    requests = [(x, query, None) if isinstance(x, Image.Image) else (None, query, None, x)
                for x in loaded if not isinstance(x, str)]
    answers = iter(vlm.generate(requests, template, params=sampling))
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
             sampling: SamplingParams | None = None) -> tuple[tuple[str, str], ...]:
    """The model, prompt and sampling columns of Parquet output: what produced the captions."""
    return (("model", str(model)), ("prompt", build_prompt(query, (), template or vlm.config.template)),
            ("sampling", sampling_json(sampling or vlm.defaults)))


def caption_images(vlm: CogVLM, images: Sequence[Path], sink: Sink, query: str = "", template: str | None = "base",
                   batch_size: int = 8, sampling: SamplingParams | None = None,
                   progress: bool | None = None, log_every: float = 30.0, media: Media = Media(),
                   decoders: int = DECODERS) -> Summary:
    """Caption the images (or clips) `sink` has not recorded yet, `batch_size` at a time. The next
    batches are read and decoded by `decoders` threads while the model works on the current one."""
    todo = [p for p in images if not sink.done(p)]
    summary = Summary(skipped=len(images) - len(todo))
    media = media.for_model(template or vlm.config.template, vlm.config)
    bar, start = progress_bar(len(todo), progress, log_every, "clip" if media.video else "img"), time.monotonic()
    try:
        with decoded_batches(todo, batch_size, lambda p: load_media(p, p, media), decoders, Waiting(summary)) as batches:
            for batch, loaded in batches:
                captions, tokens = caption_batch(vlm, loaded, query, template, sampling)
                _count(summary, bar, loaded, captions, tokens)
                if any(c is not None for c in captions):
                    sink.write([(path, c) for path, c in zip(batch, captions) if c is not None])
                bar.update(len(batch), **summary.postfix(start))
    finally:
        summary.seconds = time.monotonic() - start
        bar.close()
    return summary


ShardItem = Union[list[tuple[str, Future]], ShardError, None]


def _shard_batches(shards: Sequence[Path], columns: Columns, batch_size: int, submit: Callable[..., Future],
                   media: Media) -> Iterator[tuple[Path, ShardItem]]:
    """Per shard: (shard, batch of (key, future image or clip, or why not)) ..., then (shard, None)
    at its end, or (shard, ShardError) where the shard itself is damaged."""
    for shard in shards:
        batch: list[tuple[str, Future]] = []
        try:
            for sample in samples(shard, columns):
                batch.append((sample.key, submit(load_sample, shard, sample, media, columns.max_bytes)))
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
                   sampling: SamplingParams | None = None, progress: bool | None = None,
                   log_every: float = 30.0, media: Media = Media(), decoders: int = DECODERS) -> Summary:
    """Caption every shard `writer` has no output for, writing each output shard when its last
    sample is done; samples are read in a thread and decoded by `decoders` more while the model works."""
    todo = [s for s in shards if not writer.done(s)]
    summary = Summary(shards_skipped=len(shards) - len(todo))
    media = media.for_model(template or vlm.config.template, vlm.config)
    bar, start = progress_bar(None, progress, log_every, "clip" if media.video else "img"), time.monotonic()
    wait = Waiting(summary)
    results: list[Result] = []
    try:
        with decoder_pool(decoders) as submit:
            items = prefetch(_shard_batches(todo, columns, batch_size, submit, media))
            while (next_item := wait.next(items)) is not None:
                shard, item = next_item
                if isinstance(item, ShardError):
                    summary.shards_failed.append(str(item))
                    say(bar, f"cogvlm caption: shard not written (a rerun tries it again): {item}")
                    results = []
                elif item is None:
                    writer.write(shard, results)
                    summary.shards_written += 1
                    results = []
                else:
                    keys, futures = zip(*item)
                    loaded = wait.results(futures)
                    captions, tokens = caption_batch(vlm, loaded, query, template, sampling)
                    _count(summary, bar, loaded, captions, tokens)
                    results += [Result(k, c, img if isinstance(img, str) else None)
                                for k, c, img in zip(keys, captions, loaded)]
                    finished = summary.shards_written + len(summary.shards_failed)
                    bar.update(len(item), **summary.postfix(start, shard=f"{finished + 1}/{len(todo)}"))
    finally:
        summary.seconds = time.monotonic() - start
        bar.close()
    return summary
