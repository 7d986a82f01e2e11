"""Continuous batching: one background decode loop shared by concurrent requests.

Requests that arrive while a batch is decoding are prefilled together and join it at the next
step boundary (`BatchDecoder.join`); finished or cancelled rows leave at once. So throughput
rises with concurrency instead of requests queueing one behind another.
"""

from __future__ import annotations

import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

from .api import CogVLM
from .generate import BatchDecoder, SamplingParams, TextStream, final_text
from .prompt import PromptTokens

_DONE = object()


@dataclass
class Job:
    """One request's life in the scheduler; iterate `pieces()` for its text as it is generated."""

    prompt: PromptTokens
    params: SamplingParams
    prompt_tokens: int
    answer: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop" (</s> or a stop string) or "length"
    error: BaseException | None = None
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


class Scheduler:
    def __init__(self, vlm: CogVLM, max_batch: int = 16) -> None:
        self.vlm = vlm
        self.max_batch = max_batch
        self.batch_sizes: Counter[int] = Counter()  # decode steps seen at each batch size
        self._pending: queue.Queue[Job] = queue.Queue()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cogvlm-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt: PromptTokens, params: SamplingParams) -> Job:
        """Queue a request; raises ContextLengthError at once when it cannot fit."""
        length = self.vlm.prompt_length(prompt)
        self.vlm.generation_budget(length, params)  # validate now, in the caller's thread
        job = Job(prompt, params, length)
        self._pending.put(job)
        self._wake.set()
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
            running = sum(1 for j, _ in jobs.values() if j.finish_reason is None)
            newcomers = self._take(self.max_batch - running)
            if newcomers:
                decoder = self._admit(decoder, jobs, newcomers)
            if decoder is None or decoder.done:
                decoder, jobs = None, {}
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            for row, (job, _) in jobs.items():
                if job._cancelled.is_set() and job.finish_reason is None:
                    decoder.finish(row)
                    self._end(job, decoder, row, "cancelled")
            try:
                tokens = decoder.step()
            except Exception as e:  # e.g. out of memory: fail these requests, keep serving
                for row, (job, _) in jobs.items():
                    if job.finish_reason is None:
                        job.error = e
                        self._end(job, decoder, row, "error")
                decoder, jobs = None, {}
                continue
            if decoder.active:  # the step after the last row ended samples nothing
                self.batch_sizes[len(decoder.active)] += 1
            for row, token in tokens.items():
                job, stream = jobs[row]
                piece = stream.push(token)
                if stream.stopped:
                    decoder.finish(row)
                if piece:
                    job._queue.put(piece)
            for row in decoder.ending:
                job, stream = jobs[row]
                if job.finish_reason is None:
                    tail = stream.finish()
                    if tail:
                        job._queue.put(tail)
                    stop = decoder.finished_by_eos[row] or stream.stopped
                    self._end(job, decoder, row, "stop" if stop else "length")

    def _take(self, room: int) -> list[Job]:
        out = []
        while len(out) < max(room, 0):
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                break
            if job._cancelled.is_set():  # gave up while waiting: nothing to generate
                job.finish_reason = "cancelled"
                job._queue.put(_DONE)
            else:
                out.append(job)
        return out

    def _admit(self, decoder: BatchDecoder | None, jobs: dict, newcomers: list[Job]) -> BatchDecoder | None:
        try:
            fresh = self.vlm.decoder([j.prompt for j in newcomers], [j.params for j in newcomers])
        except Exception as e:  # surface to the waiting clients instead of killing the loop
            for job in newcomers:
                job.error = e
                job._queue.put(_DONE)
            return decoder
        if decoder is None or decoder.done:
            decoder, rows = fresh, list(range(len(newcomers)))
            jobs.clear()
        else:
            rows = decoder.join(fresh)
        for row, job in zip(rows, newcomers):
            jobs[row] = (job, TextStream(self.vlm.tokenizer, job.params.stop))
        return decoder

    def _end(self, job: Job, decoder: BatchDecoder, row: int, reason: str) -> None:
        generated = decoder.generated[row]
        job.completion_tokens = len(generated)
        job.answer = final_text(self.vlm.tokenizer, generated, job.params.stop)
        job.finish_reason = reason
        job._queue.put(_DONE)
