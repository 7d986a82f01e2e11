"""Progress for long jobs (fine-tuning, evaluation, captioning) that reads well anywhere.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, a cluster job's stdout): one plain
line every `every` seconds and one at the end, since a bar's carriage returns turn a log into
one unreadable line, and a job that says nothing for an hour looks hung.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 every: float = 30.0, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.every, self.enabled = total, desc, unit, every, enabled
        self.done, self.postfix = initial, ""
        self.start = self.last = time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(**postfix, refresh=False)
            self.bar.update(n)
            return
        self.postfix = " ".join(f"{k}={v}" for k, v in postfix.items()) or self.postfix
        if self.enabled and time.monotonic() - self.last >= self.every:
            self._line()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line()

    def _line(self) -> None:
        self.last = time.monotonic()
        elapsed = self.last - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        known = self.total is not None  # None: a stream of unknown length (shards of a dataset)
        eta = f", eta {(self.total - self.done) / rate:.0f}s" if known and rate > 0 and self.done < self.total else ""
        print(f"{self.desc}: {self.done}{f'/{self.total}' if known else ''} {self.unit} ({rate:.2f} {self.unit}/s{eta})"
              f"{' ' + self.postfix if self.postfix else ''}", file=self.stream, flush=True)
