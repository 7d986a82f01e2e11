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
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .api import CogVLM
from .errors import GenerationError, TensorParallelError
from .generate import BatchDecoder, SamplingParams, TextStream, final_text
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
        self._thread = threading.Thread(target=self._loop, name="cogvlm-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt: PromptTokens, params: SamplingParams) -> Job:
        """Queue a request; raises ContextLengthError at once when it cannot fit, and the model's
        `TensorParallelError` once it has stopped."""
        if self.failure is not None:
            raise self.failure
        length = self.vlm.prompt_length(prompt)
        self.vlm.generation_budget(length, params)  # validate now, in the caller's thread
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
        prefilled alone, so a request that fails for its own reasons fails alone."""
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

    def _end(self, jobs: dict[int, tuple[Job, TextStream]], decoder: BatchDecoder, row: int, reason: str,
             error: BaseException | None = None) -> None:
        """End a row's job and forget the row: a batch that never drains must not grow."""
        job, _ = jobs.pop(row)
        generated = decoder.forget(row)
        job.completion_tokens = len(generated)
        job.answer = final_text(self.vlm.tokenizer, generated, job.params.stop)
        job._finish(reason, error)


def _stopped(jobs: list[Job], error: TensorParallelError) -> None:
    """End `jobs` because the model stopped for good (not for anything in the requests)."""
    for job in jobs:
        job.stopped = True
        job._finish("error", error)
