"""Continuous batching: one background decode loop shared by concurrent requests.

Requests that arrive while a batch is decoding are prefilled together and join it at the next
step boundary (`BatchDecoder.join`); finished or cancelled rows leave at once. So throughput
rises with concurrency instead of requests queueing one behind another.

Every job ends exactly once (`Job._finish`), in one of four states, and a failure is confined to
the requests it belongs to: a prompt that fails its prefill is retried alone, a row whose
sampling fails leaves the batch alone (`BatchDecoder.failed`), and only an engine failure of the
whole step (out of memory) ends the whole batch. A failed job keeps the error's message, not the
exception: its traceback's frames would keep the batch's KV cache alive. A tensor-parallel
failure (`TensorParallelError`: a rank failed, and every rank has stopped) ends every job, running
or waiting, as `stopped`, and the loop: the model is gone, `on_failure` is told (the server exits).

Memory is reserved before it is taken (`reserve`): a KV cache is allocated at a request's full
length up front, and a join may re-allocate the whole batch's cache at the newcomer's length. A
request whose cache cannot fit even alone is refused at `submit` (ContextLengthError: the server
answers 400); one that cannot fit beside the running batch ends alone with `busy` set (503, retry)
before anything is allocated: `KVCache.concat` frees the running cache one layer at a time as it
grows it, so a join that failed half-way would take every running request with it.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .api import CogVLM
from .errors import ContextLengthError, GenerationError, TensorParallelError
from .generate import BatchDecoder, SamplingParams, TextStream, final_text
from .model import DECODE_WINDOW, row_bucket
from .plan import embedding_bytes, vit_bytes
from .prompt import PromptTokens

_DONE = object()
log = logging.getLogger("cogvlm.scheduler")


@dataclass
class Job:
    """One request's life in the scheduler; iterate `pieces()` for its text as it is generated."""

    prompt: PromptTokens
    params: SamplingParams
    prompt_tokens: int
    answer: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (</s> or a stop string), "length", "cancelled" or "error"
    error: GenerationError | None = None  # why, when finish_reason is "error"
    stopped: bool = False  # the error ended the model, not just this request (the server answers 503)
    busy: bool = False  # its KV cache did not fit beside the running batch (the server answers 503: retry)
    _queue: queue.Queue = field(default_factory=queue.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def pieces(self, timeout: float | None = None) -> Iterator[str]:
        """Text pieces until the answer is complete; raises the job's error if it failed."""
        while True:
            item = self._queue.get(timeout=timeout)
            if item is _DONE:
                if self.error is not None:
                    raise self.error
                return
            yield item

    def result(self, timeout: float | None = None) -> str:
        for _ in self.pieces(timeout):
            pass
        return self.answer

    def cancel(self) -> None:
        """Stop generating for this job (a client went away); its slot is freed at the next step."""
        self._cancelled.set()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        """The one way a job ends: once, waking whoever waits on `pieces()`."""
        if self.finish_reason is not None:
            return
        if error is not None:
            self.error = GenerationError(f"{type(error).__name__}: {error}")
        self.finish_reason = reason
        self._queue.put(_DONE)


class Scheduler:
    def __init__(self, vlm: CogVLM, max_batch: int = 16, on_failure: Callable[[], None] | None = None) -> None:
        self.vlm = vlm
        self.max_batch = max_batch
        self.on_failure = on_failure  # called once the model has stopped for good
        self.failure: TensorParallelError | None = None  # why it stopped
        self.batch_sizes: Counter[int] = Counter()  # decode steps seen at each batch size
        self._pending: queue.Queue[Job] = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._held = 0  # bytes of the running batch's KV cache (set by the loop, read by `submit`)
        self._thread = threading.Thread(target=self._loop, name="cogvlm-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt: PromptTokens, params: SamplingParams) -> Job:
        """Queue a request; raises ContextLengthError at once when it cannot fit, and the model's
        `TensorParallelError` once it has stopped."""
        if self.failure is not None:
            raise self.failure
        length = self.vlm.prompt_length(prompt)
        budget = self.vlm.generation_budget(length, params)  # validate now, in the caller's thread
        cache, tower = cache_bytes(self.vlm, 1, length + budget), visual_bytes(self.vlm, [prompt])
        need, free = cache + tower, free_memory(self.vlm.model.device) + self._held
        if need > free:  # it could not run even once the running batch has drained
            frames = f" and its pictures' encoding ({tower / 2**20:.0f} MiB)" if tower else ""
            raise ContextLengthError(
                f"this request's KV cache ({length} prompt + {budget} new tokens, {cache / 2**20:.0f} MiB){frames} "
                f"take {need / 2**20:.0f} MiB and this server has {free / 2**20:.0f} MiB for them: lower max_tokens"
                f"{' or send fewer frames' if self.vlm.config.video else ''}")
        job = Job(prompt, params, length)
        self._pending.put(job)
        self._wake.set()
        if self.failure is not None:  # it stopped while this job was queued: the loop will not see it
            _stopped([job], self.failure)
        return job

    def close(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)

    @property
    def max_batch_seen(self) -> int:
        return max(self.batch_sizes, default=0)

    # ---- the loop (one thread owns the model) ---------------------------------------------------
    def _loop(self) -> None:
        decoder: BatchDecoder | None = None
        jobs: dict[int, tuple[Job, TextStream]] = {}
        while not self._stop:
            try:
                decoder = self._tick(decoder, jobs)
            except TensorParallelError as e:  # every rank has stopped: no later batch can run
                log.error("the model stopped: %s; failing every request", e)
                self.failure = e
                _stopped([j for j, _ in jobs.values()] + self._take(self._pending.qsize() + 1), e)
                jobs.clear()
                if self.on_failure is not None:
                    self.on_failure()
                return
            except Exception as e:  # the engine failed for the whole batch (e.g. out of memory)
                log.exception("decode step failed; failing the %d requests of this batch", len(jobs))
                for job, _ in jobs.values():
                    job._finish("error", e)
                decoder = None
            if decoder is None:
                jobs.clear()
        for job, _ in jobs.values():
            job._finish("cancelled")
        for job in self._take(self._pending.qsize() + 1):
            job._finish("cancelled")

    def _tick(self, decoder: BatchDecoder | None, jobs: dict[int, tuple[Job, TextStream]]) -> BatchDecoder | None:
        """Admit newcomers, then one decode step; returns the decoder (None: the batch is over)."""
        newcomers = self._take(self.max_batch - len(jobs))
        if newcomers:
            decoder = self._admit(decoder, jobs, newcomers)
        if decoder is None or decoder.done:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            return None
        for row, (job, _) in list(jobs.items()):
            if job._cancelled.is_set():
                decoder.finish(row)
                self._end(jobs, decoder, row, "cancelled")
        tokens = decoder.step()
        if decoder.active:  # the step after the last row ended samples nothing
            self.batch_sizes[len(decoder.active)] += 1
        for row, error in decoder.failed.items():
            log.error("a request failed alone in its batch: %s: %s", type(error).__name__, error)
            self._end(jobs, decoder, row, "error", error)
        decoder.failed.clear()
        for row, token in tokens.items():
            if row not in jobs:  # cancelled before its first step
                continue
            job, stream = jobs[row]
            piece = stream.push(token)
            if stream.stopped:
                decoder.finish(row)
            if piece:
                job._queue.put(piece)
        for row in decoder.ending:
            if row in jobs:
                job, stream = jobs[row]
                tail = stream.finish()
                if tail:
                    job._queue.put(tail)
                stop = decoder.finished_by_eos[row] or stream.stopped
                self._end(jobs, decoder, row, "stop" if stop else "length")
        return decoder

    def _take(self, room: int) -> list[Job]:
        out = []
        while len(out) < max(room, 0):
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                break
            if job._cancelled.is_set():  # gave up while waiting: nothing to generate
                job._finish("cancelled")
            else:
                out.append(job)
        return out

    def _admit(self, decoder: BatchDecoder | None, jobs: dict, newcomers: list[Job]) -> BatchDecoder | None:
        """Prefill the newcomers together and join them to the batch. If that fails, each is
        prefilled alone, so a request that fails for its own reasons fails alone. The memory the
        prefill and the join take is reserved first; when it is not there, the newcomers are tried
        one by one, and one that does not fit alone ends `busy`, the running batch untouched."""
        try:
            reserve(self.vlm.model.device, self._join_bytes(decoder, newcomers))
        except MemoryError as e:
            if len(newcomers) > 1:
                for job in newcomers:
                    decoder = self._admit(decoder, jobs, [job])
                return decoder
            log.warning("a request did not fit beside the running batch: %s", e)
            newcomers[0].busy = True
            newcomers[0]._finish("error", e)
            return decoder
        try:
            fresh = self.vlm.decoder([j.prompt for j in newcomers], [j.params for j in newcomers])
        except TensorParallelError as e:  # not this prompt's fault: the model stopped (`_loop`)
            _stopped(newcomers, e)
            raise
        except Exception as e:
            if len(newcomers) > 1:
                for job in newcomers:
                    decoder = self._admit(decoder, jobs, [job])
                return decoder
            log.exception("prefill failed")
            newcomers[0]._finish("error", e)
            return decoder
        if decoder is None or decoder.done:
            decoder, rows = fresh, list(range(len(newcomers)))
            jobs.clear()
        else:
            rows = decoder.join(fresh)
        for row, job in zip(rows, newcomers):
            jobs[row] = (job, TextStream(self.vlm.tokenizer, job.params.stop))
        return decoder

    def _join_bytes(self, decoder: BatchDecoder | None, newcomers: list[Job]) -> int:
        """Bytes the newcomers' prefill cache takes and the tower's peak encoding their pictures
        together (a clip: all its frames), plus, when they join a running batch whose buffers lack
        the room, the grown cache `KVCache.concat` allocates (the old one is freed only as the new
        one fills, so both count)."""
        budgets = [self.vlm.generation_budget(j.prompt_tokens, j.params) for j in newcomers]
        longest = max(j.prompt_tokens for j in newcomers)
        need = cache_bytes(self.vlm, len(newcomers), longest + max(budgets))
        need += visual_bytes(self.vlm, [j.prompt for j in newcomers])
        if decoder is None or decoder.done:
            self._held = 0
            return need
        cache = decoder.cache
        self._held = cache_bytes(self.vlm, cache.row_capacity, cache.max_len)
        remaining = max([decoder.budgets[r] - len(decoder.generated[r]) for r in decoder.active] + budgets)
        rows, capacity = cache.batch_size + len(newcomers), max(cache.length, longest) + remaining
        if cache.row_capacity >= rows and cache.max_len >= capacity:
            return need  # joined in place
        return need + cache_bytes(self.vlm, rows, capacity)

    def _end(self, jobs: dict[int, tuple[Job, TextStream]], decoder: BatchDecoder, row: int, reason: str,
             error: BaseException | None = None) -> None:
        """End a row's job and forget the row: a batch that never drains must not grow."""
        job, _ = jobs.pop(row)
        generated = decoder.forget(row)
        job.completion_tokens = len(generated)
        job.answer = final_text(self.vlm.tokenizer, generated, job.params.stop)
        job._finish(reason, error)


def cache_bytes(vlm: CogVLM, rows: int, slots: int) -> int:
    """Bytes of a KV cache of `rows` x `slots` (k and v of every layer, and the valid mask), at the
    shapes a bucketed (CUDA-graph) cache rounds up to."""
    cfg, model = vlm.config, vlm.model
    if getattr(model, "decode_buckets", False):
        rows, slots = row_bucket(rows), max(DECODE_WINDOW, 1 << (slots - 1).bit_length())
    kv_heads = cfg.num_key_value_heads // getattr(model, "world", 1)  # tensor parallel: this rank's share
    per_slot = 2 * cfg.num_layers * kv_heads * cfg.head_dim * model.dtype.itemsize + 1
    return rows * slots * per_slot


def visual_bytes(vlm: CogVLM, prompts: list[PromptTokens]) -> int:
    """The prefill's peak for the pictures of `prompts`, encoded as one batch: an image each, a
    clip's every frame (plan.vit_bytes and plan.embedding_bytes; the slots they fill are in the
    KV cache's count already: 1 + 67 T for a chat clip of T frames)."""
    pictures = sum(len(p.frames) if p.frames is not None else int(p.pixels is not None) for p in prompts)
    if not pictures:
        return 0
    world, dtype = getattr(vlm.model, "world", 1), vlm.model.dtype
    return vit_bytes(vlm.config, pictures, world, dtype) + embedding_bytes(vlm.config, pictures, dtype)


def free_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on `device`. CUDA: the driver's free memory plus
    what PyTorch's allocator holds unused. CPU: the kernel's MemAvailable, within the cgroup's
    memory.max and the process's RLIMIT_AS, whichever is tightest: on Linux a too-large CPU
    allocation does not fail, it is killed later by the OOM killer, so it must be refused before."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    limits = [_meminfo("/proc/meminfo", "MemAvailable:")]
    try:
        cap, used = open("/sys/fs/cgroup/memory.max").read().strip(), open("/sys/fs/cgroup/memory.current").read()
        if cap != "max":
            limits.append(int(cap) - int(used))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - _meminfo(f"/proc/{os.getpid()}/status", "VmSize:"))
    known = [n for n in limits if n is not None]
    return max(min(known), 0) if known else 2**62


def _meminfo(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes (None off Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def reserve(device: torch.device, nbytes: int) -> None:
    """Raise MemoryError unless `nbytes` can be allocated on `device` now: checked against
    `free_memory`, then proven by allocating them once (and freeing them: CUDA's allocator keeps
    the block for the allocation that follows; on CPU the pages were never touched)."""
    free = free_memory(device)
    if nbytes > free:
        raise MemoryError(f"the KV cache needs {nbytes / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free; "
                          f"retry when the running requests have finished")
    try:
        probe = torch.empty(nbytes, dtype=torch.uint8, device=device)
    except RuntimeError as e:  # torch.OutOfMemoryError, or the CPU allocator's "can't allocate memory"
        raise MemoryError(f"the KV cache needs {nbytes / 2**20:.0f} MiB, which could not be allocated "
                          f"({type(e).__name__}); retry when the running requests have finished") from None
    del probe


def _stopped(jobs: list[Job], error: TensorParallelError) -> None:
    """End `jobs` because the model stopped for good (not for anything in the requests)."""
    for job in jobs:
        job.stopped = True
        job._finish("error", error)
