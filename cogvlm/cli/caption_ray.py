"""`cogvlm caption --ray`: caption tar/Parquet shards with Ray Data, on a laptop or a cluster.

Why it is built this way:
- The input is the list of shards not done yet; a read stage turns each shard into blocks of
  encoded samples (a generator, so a shard never sits in memory whole), and an actor pool of
  model replicas captions them: one model load per actor, reused for all its batches. Ray Data's
  streaming executor bounds what is in flight (back-pressure), so memory stays flat.
- A replica that dies mid-batch is restarted and its batch retried (Ray Data's actor pool
  defaults): nothing is lost. Every row carries (shard, index); the driver keeps the
  first result per row, so a retry can never write a sample twice. Each shard ends with a marker
  row holding its sample count; when a shard's rows are all in, the driver writes its output
  shard atomically (data/shards.py), as the single-machine run does.
- Replicas receive the driver's `LoadOptions` and `SamplingParams` as they are (frozen values
  Ray pickles), so every replica loads and samples exactly as the driver was told.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..caption import DECODERS, Media, Summary, caption_batch, load_sample, progress_bar, run_meta, say
from ..data.shards import Columns, Result, Sample, ShardError, ShardWriter, samples
from ..generate import SamplingParams
from ..image import MAX_IMAGE_BYTES
from ..options import LoadOptions

ROWS_PER_BLOCK = 32  # samples per block out of the read stage: a few MB of encoded images
CLIPS_PER_BLOCK = 4  # or of encoded clips, which weigh some MB each


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run: the cluster (None: a local instance), the replicas and what each
    takes, images per batch, seconds between progress lines off a terminal, decoder threads per replica."""

    address: str | None = None
    replicas: int = 1
    gpus_per_replica: float = 0
    cpus_per_replica: float = 1
    batch_size: int = 8
    log_every: float = 30.0
    decoders: int = DECODERS


def _schema():
    import pyarrow as pa

    return pa.schema([("shard", pa.string()), ("index", pa.int64()), ("key", pa.string()), ("image", pa.binary()),
                      ("source", pa.string()), ("error", pa.string()), ("count", pa.int64())])


def read_shards(batch: dict[str, Any], columns: Columns) -> Iterator[Any]:
    """Read stage: the samples of each shard as blocks, then a marker row (index -1) with the
    count, or with the error of a shard that cannot be read."""
    import pyarrow as pa

    def block(rows: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=_schema())

    for name in batch["shard"]:
        shard, rows, count, error = Path(str(name)), [], 0, None
        per_block = CLIPS_PER_BLOCK if columns.video else ROWS_PER_BLOCK
        try:
            for sample in samples(shard, columns):
                rows.append({"shard": str(shard), "index": count, "key": sample.key, "error": sample.error,
                             "image": sample.image if isinstance(sample.image, bytes) else None,
                             "source": sample.image if isinstance(sample.image, str) else None})
                count += 1
                if len(rows) == per_block:
                    yield block(rows)
                    rows = []
        except ShardError as e:
            error = str(e)
        yield block(rows + [{"shard": str(shard), "index": -1, "count": count, "error": error}])


class Captioner:
    """One model replica: loads the model once, then captions every batch Ray hands it, its
    images or clips decoded by `decoders` threads at once. Marker rows pass through."""

    def __init__(self, options: LoadOptions, sampling: SamplingParams, query: str, template: str | None,
                 threads: int, media: Media = Media(), decoders: int = 1, max_bytes: int = MAX_IMAGE_BYTES) -> None:
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from ..api import CogVLM

        torch.set_num_threads(threads)
        self.vlm = CogVLM.from_pretrained(options)
        self.vlm.defaults = sampling
        self.query, self.template = query, template
        self.media = media.for_model(template or self.vlm.config.template, self.vlm.config)
        self.pool = ThreadPoolExecutor(max(1, decoders), thread_name_prefix="cogvlm-decode")
        self.max_bytes = max_bytes  # Columns.max_bytes: a path or URL is read up to it
        self.meta = dict(run_meta(self.vlm, str(options.model), query, template))
        self.replica = f"{os.getpid()}@{socket.gethostname()}"

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        rows = batch.to_pylist()
        start = time.perf_counter()
        work = [r for r in rows if r["index"] >= 0]
        def load(r: dict[str, Any]) -> Any:
            sample = Sample(r["key"], r["image"] or r["source"], r["error"])
            return load_sample(Path(r["shard"]), sample, self.media, self.max_bytes)

        loaded = list(self.pool.map(load, work))
        captions, _ = caption_batch(self.vlm, loaded, self.query, self.template)
        seconds = (time.perf_counter() - start) / max(len(work), 1)
        for row, img, caption in zip(work, loaded, captions):
            row.update(caption=caption, error=img if isinstance(img, str) else None,
                       tokens=len(self.vlm.tokenizer.encode(caption)) if caption is not None else 0)
        for row in rows:
            del row["image"], row["source"]
            row.update(replica=self.replica, seconds=seconds, **self.meta)
            row.setdefault("caption", None)
            row.setdefault("tokens", 0)
        return pa.Table.from_pylist(rows)


def _init_ray(address: str | None) -> None:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("--ray needs Ray: pip install 'cogvlm[ray]'") from None
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local instance, so the same command runs on a laptop
        ray.init(include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours reports images/s and tokens/s
    ctx.print_on_execution_start = False


def caption_on_ray(options: LoadOptions, sampling: dict[str, Any], ray_options: RayOptions, shards: Sequence[Path],
                   writer: ShardWriter, columns: Columns, query: str, template: str | None,
                   media: Media = Media()) -> Summary:
    """Caption the shards without output in `writer`'s folder on a pool of `ray_options.replicas`
    actors; `sampling` holds the sampling flags, over the model's defaults."""
    import ray

    from ..checkpoint import read_config, resolve
    from .flags import sampling_params

    # a wrong --model or --max_length ends here with one line, not in every actor
    params = sampling_params(read_config(resolve(options.model)), sampling)
    todo = [s for s in shards if not writer.done(s)]
    summary = Summary(shards_skipped=len(shards) - len(todo))
    if not todo:
        return summary
    _init_ray(ray_options.address)
    gpus = ray_options.gpus_per_replica
    options = replace(options, device=(options.device or "cuda") if gpus else "cpu")
    items = ray.data.from_items([{"shard": str(s)} for s in todo], override_num_blocks=len(todo))
    # reading is light I/O next to a model replica: it takes no CPU slot, or replicas would starve it
    blocks = items.map_batches(read_shards, fn_kwargs={"columns": columns}, batch_size=1, num_cpus=0,
                               batch_format="numpy")
    # Ray Data's actor pools restart lost actors and retry their tasks (max_restarts and
    # max_task_retries -1 by default): a replica that dies mid-batch costs a model load, no samples
    captioned = blocks.map_batches(
        Captioner, batch_format="pyarrow", batch_size=ray_options.batch_size,
        compute=ray.data.ActorPoolStrategy(size=ray_options.replicas),
        num_cpus=ray_options.cpus_per_replica, num_gpus=gpus or None,
        fn_constructor_kwargs={"options": options, "sampling": params, "query": query, "template": template,
                               "threads": max(1, int(ray_options.cpus_per_replica)), "media": media,
                               "decoders": ray_options.decoders, "max_bytes": columns.max_bytes})
    results: dict[str, dict[int, Result]] = {str(s): {} for s in todo}
    counts: dict[str, int] = {}
    bar, start = progress_bar(None, None, ray_options.log_every), time.monotonic()
    try:
        for batch in captioned.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                shard = row["shard"]
                if shard not in results:
                    continue  # written already; a retried block repeats its rows
                if row["index"] < 0:
                    counts[shard] = row["count"]
                    if row["error"] is not None:
                        summary.shards_failed.append(row["error"])
                        say(bar, f"cogvlm caption: shard not written (a rerun tries it again): {row['error']}")
                        del results[shard]
                        continue
                elif row["index"] not in results[shard]:
                    results[shard][row["index"]] = Result(row["key"], row["caption"], row["error"])
                    summary.done += row["caption"] is not None
                    summary.tokens += row["tokens"]
                    if row["error"] is not None:
                        summary.failed.append(row["error"])
                        say(bar, f"cogvlm caption: skipped: {row['error']}")
                    replica = summary.replicas.setdefault(row["replica"], [0, 0.0])
                    replica[0] += 1
                    replica[1] += row["seconds"]
                    bar.update(1, **summary.postfix(start, shards=f"{summary.shards_written}/{len(todo)} written"))
                if shard in counts and len(results[shard]) == counts[shard]:
                    if not writer.meta:  # the replicas say what produced the captions
                        writer = replace(writer, meta=tuple((k, row[k]) for k in ("model", "prompt", "sampling")))
                    rows = results.pop(shard)
                    writer.write(Path(shard), [rows[i] for i in range(counts[shard])])
                    summary.shards_written += 1
    finally:
        summary.seconds = time.monotonic() - start
        bar.close()
        ray.shutdown()
    for shard in results:  # cannot happen unless Ray gave up on a block: never write such a shard
        summary.shards_failed.append(f"{shard} was not completed; a rerun tries it again")
    return summary
