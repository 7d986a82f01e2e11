"""`cogvlm caption PATH...`: the command-line half of captioning (cogvlm/caption.py holds the
job): flag checks, dry runs, torchrun's item split, the run's report."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..api import VIDEO_CAPTION_PROMPT
from ..caption import (DECODERS, OUTPUT_FORMATS, Media, RecordFile, Summary, TextFiles, caption_images, caption_shards,
                       find_files, run_meta)
from ..checkpoint import read_config, resolve
from ..config import registry_entry
from ..data.shards import (IMAGE_COLUMNS, OUTPUT_FORMATS as OUTPUT_SHARD_FORMATS, VIDEO_COLUMNS, Columns, ShardError,
                           ShardWriter, count_samples, expand, find_shards, is_shard, output_path, parquet_columns)
from ..errors import ContextLengthError, UsageError
from ..files import temp_path
from ..image import MAX_IMAGE_BYTES
from ..jobs import leave_group, share_items
from ..options import LoadOptions
from ..video import VideoLimits
from .flags import add_model_flags, load_model, load_options, positive_int, sampling_flags


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


def _report(totals: dict[str, int], summary: Summary, what: str, where: str, unit: str = "images") -> None:
    t = totals
    if what == "files":
        print(f"cogvlm caption: {t['done']} captioned, {t['skipped']} skipped (already done), {t['failed']} failed "
              f"(of {t['done'] + t['skipped'] + t['failed']} {unit}){where}")
    else:
        print(f"cogvlm caption: {t['done']} captioned, {t['failed']} failed; shards: {t['shards_written']} written, "
              f"{t['shards_skipped']} skipped (already done), {t['shards_failed']} unreadable{where}")
    seconds = max(summary.seconds, 1e-9)
    print(f"cogvlm caption: {t['done'] / seconds:.2f} {unit}/s, {t['tokens'] / seconds:.1f} tokens/s "
          f"in {summary.seconds:.1f} s")
    if summary.waited and t['done'] + t['failed']:  # this process's (on Ray the replicas decode their own)
        print(f"cogvlm caption: the model waited {summary.waited:.1f} s ({summary.waited / seconds:.0%}) for "
              f"{unit} to be read and decoded")
    for replica, (images, busy) in sorted(summary.replicas.items()):
        print(f"cogvlm caption: replica {replica}: {int(images)} {unit}, {images / max(busy, 1e-9):.2f} {unit}/s "
              f"while busy")


def _mode(args: argparse.Namespace) -> None:
    """Flag checks that need no model."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, not {args.batch_size}")
    if args.decoders < 1:
        raise UsageError(f"--decoders must be >= 1, not {args.decoders}")
    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, not {args.replicas}")
    if args.gpus_per_replica < 0 or args.cpus_per_replica <= 0:
        raise UsageError("--gpus-per-replica must be >= 0 and --cpus-per-replica > 0")
    if not args.caption_key or "/" in args.caption_key or args.caption_key == "error":
        raise UsageError(f"--caption-key must be a file extension such as txt or cogvlm.txt, not {args.caption_key!r}")
    if args.max_image_bytes < 1:
        raise UsageError(f"--max-image-bytes must be >= 1, not {args.max_image_bytes}")
    if (args.ray_address or args.replicas != 1 or args.gpus_per_replica) and not args.ray:
        raise UsageError("--ray-address, --replicas and --gpus-per-replica go with --ray")


def _dataset_writer(args: argparse.Namespace, shards: Sequence[Path], max_bytes: int) -> ShardWriter:
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
    return ShardWriter(args.output, args.format, args.caption_key, max_bytes=max_bytes)


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


def _media(options: LoadOptions, max_video_bytes: int) -> Media:
    """Clips for a video model (its registry entry or its config.json says), each file up to
    `max_video_bytes`, images otherwise; known before the model loads, so the files to caption
    can be listed first."""
    entry = None if Path(options.model).expanduser().exists() else registry_entry(str(options.model))
    config = entry.config if entry is not None and entry.config is not None else read_config(resolve(options.model))
    if config.video:
        from ..video import pyav

        pyav()  # without PyAV: one line now, not one error per clip after the model has loaded
    return Media(video=config.video, limits=VideoLimits(max_bytes=max_video_bytes))


def cmd_caption(args: argparse.Namespace) -> int:
    _mode(args)
    sampling, options = sampling_flags(args), load_options(args)
    media = _media(options, args.max_video_bytes)
    unit = "clips" if media.video else "images"
    paths = expand(args.paths)
    dataset = [p for p in paths if is_shard(p)]
    if dataset and len(dataset) < len(paths):
        raise UsageError(f"give either tar/Parquet shards or {unit} and folders, not both in one run")
    if args.ray and not dataset:
        raise UsageError(f"--ray captions tar or Parquet shards; caption folders of {unit} without --ray "
                         f"(or under torchrun)")
    if args.query is not None:
        query, template = args.query, args.template
    else:  # plain captioning: images as the image models' authors do, clips as CogVideoX's captioner does
        query, template = ("", args.template or "base") if not media.video else (VIDEO_CAPTION_PROMPT,
                                                                                  args.template or "chat")
    if dataset:
        shards = find_shards(dataset)
        max_bytes = media.limits.max_bytes if media.video else args.max_image_bytes
        writer = _dataset_writer(args, shards, max_bytes)
        columns = Columns(args.image_column, args.id_column, max_bytes, args.allow_local_files, media.video)
        for shard in shards:
            if shard.suffix.lower() == ".parquet":
                try:
                    parquet_columns(shard, columns)  # a wrong --image-column stops here, before the model loads
                except ShardError:
                    pass  # a damaged file: the run reports it and goes on
        if args.dry_run:
            return _dry_run(shards, writer, columns)
        if args.ray:
            from .caption_ray import RayOptions, caption_on_ray

            ray = RayOptions(args.ray_address, args.replicas, args.gpus_per_replica, args.cpus_per_replica,
                             args.batch_size, args.log_every, args.decoders)
            summary = caption_on_ray(options, sampling, ray, shards, writer, columns, query, template, media)
            _report(_totals(summary, 1), summary, "shards", f" -> {args.output}", unit)
            return 0
    else:
        images = find_files(paths, media.extensions)
        if not images:  # a wrong folder, or clips given to an image model: said before the model loads
            raise UsageError(f"no {unit} ({', '.join(sorted(media.extensions))}) in {', '.join(map(str, paths))}")
        if args.dry_run:
            records = RecordFile(args.output, 0, media.field) if args.output else TextFiles(images)
            todo = sum(not records.done(p) for p in images)
            print(f"cogvlm caption: would caption {todo} of {len(images)} {unit} ({len(images) - todo} already done) "
                  f"-> {args.output or '.txt next to each image'} (dry run: nothing was loaded or written)")
            return 0
    rank, world, options = share_items(options)
    # checked before the model loads: an --output that cannot be written, .txt files that would clash
    sink = None if dataset else RecordFile(args.output, rank, media.field) if args.output else TextFiles(images)
    vlm = load_model(options, sampling)
    progress = None if rank == 0 else False
    try:
        if dataset:
            writer = replace(writer, meta=run_meta(vlm, args.model, query, template))
            summary = caption_shards(vlm, shards[rank::world], writer, columns, query, template, args.batch_size,
                                     progress=progress, log_every=args.log_every, media=media, decoders=args.decoders)
        else:
            try:
                summary = caption_images(vlm, images[rank::world], sink, query, template, args.batch_size,
                                         progress=progress, log_every=args.log_every, media=media,
                                         decoders=args.decoders)
            finally:
                sink.close()
    except ContextLengthError as e:
        raise UsageError(str(e)) from None
    totals = _totals(summary, world)
    if rank == 0:
        if not dataset and isinstance(sink, RecordFile):
            sink.merge()
        where = f" -> {args.output}" if args.output else ""
        _report(totals, summary, "shards" if dataset else "files", where, unit)
    if world > 1:
        leave_group()
    return 0


def add_caption_verb(verbs: Any) -> None:
    """Register `cogvlm caption` on the top-level parser's subcommands."""
    p = verbs.add_parser("caption", help="caption folders of images or videos, or tar/Parquet datasets (batched, "
                                         "resumable; torchrun or Ray for several GPUs)",
                         description="Caption images under files and folders (recursive): writes photo.txt next to "
                                     "photo.jpg, or one JSONL/CSV file with --output; with a video model "
                                     "(cogvlm2-llama3-caption, ...) the clips (.mp4 .webm .mkv .mov .avi) instead, as "
                                     "CogVideoX's captioner does (docs/video.md). Or caption datasets of "
                                     "webdataset .tar and .parquet shards (brace patterns such as "
                                     "'shards/{00000..00127}.tar' work): one output shard per input shard in "
                                     "--output DIR. A rerun skips work already done. Under torchrun "
                                     "--nproc_per_node N each process takes a share; --ray runs on a Ray cluster. "
                                     "See docs/caption.md.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image (or video) files and folders, or .tar / .parquet "
                                                            "shards")
    add_model_flags(p)
    p.add_argument("--query", help="ask this instead of captioning (default: the base template with an empty "
                                   "query, plain captioning; a video model: 'Please describe this video in detail.' "
                                   "in the chat template; with --query the model's template unless --template)")
    p.add_argument("--output", type=Path, metavar="FILE_OR_DIR",
                   help="images: write all captions to one .jsonl or .csv file instead of a .txt next to each image; "
                        "shards: the output folder (required)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images captioned together (default 8)")
    p.add_argument("--decoders", type=int, default=DECODERS, metavar="N",
                   help=f"threads reading and decoding the next batches while the model works (default {DECODERS}: "
                        f"the cores, at most 8)")
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
                   help=f"Parquet: the column of image (or clip) bytes or paths/URLs (default: the first of "
                        f"{', '.join(IMAGE_COLUMNS)}; for a video model {', '.join(VIDEO_COLUMNS)})")
    d.add_argument("--id-column", metavar="NAME", help="Parquet: the sample id column (default: key or id, else "
                                                      "the row number)")
    d.add_argument("--max-image-bytes", type=int, default=MAX_IMAGE_BYTES, metavar="N",
                   help=f"the largest image a sample or a Parquet cell may hold, checked on the tar header or "
                        f"the Parquet metadata before reading (default {MAX_IMAGE_BYTES}, as cogvlm serve); "
                        f"larger samples become error rows")
    d.add_argument("--max-video-bytes", type=positive_int, default=VideoLimits.max_bytes, metavar="N",
                   help=f"a video model's --max-image-bytes: the largest clip a sample, a Parquet cell or a file "
                        f"may hold (default {VideoLimits.max_bytes})")
    d.add_argument("--allow-local-files", action="store_true",
                   help="Parquet: paths may name any file (default: only files in the Parquet file's folder)")
    r = p.add_argument_group("Ray (pip install 'cogvlm[ray]')")
    r.add_argument("--ray", action="store_true", help="caption shards with Ray Data on an actor pool of model replicas")
    r.add_argument("--ray-address", metavar="ADDR", help="the cluster to join (default: start a local Ray instance)")
    r.add_argument("--replicas", type=int, default=1, metavar="N", help="model replicas (default 1)")
    r.add_argument("--gpus-per-replica", type=float, default=0, metavar="G", help="GPUs per replica (default 0: CPU)")
    r.add_argument("--cpus-per-replica", type=float, default=1, metavar="C",
                   help="CPUs per replica (default 1; also its torch threads)")
    p.set_defaults(func=cmd_caption)
