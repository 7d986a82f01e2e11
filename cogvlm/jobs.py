"""What the resumable, data-parallel jobs (captioning, evaluation) share.

- `Journal`: an append-only JSONL file of whole records, flushed and fsynced after every write,
  so a SIGKILL loses at most the batch in flight; on reopening, a partial last line (a killed
  write) is cut off before anything is appended, or the next record would extend it.
- `torchrun_group` / `share_items`: under `torchrun --nproc_per_node N` each process loads a model
  of its own and takes every N-th item; only `--tp N` splits one model over the processes instead.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterable

from .errors import UsageError, WriteError
from .options import LoadOptions, launched_by_torchrun


def read_journal(path: Path, what: str) -> tuple[list[dict[str, Any]], int]:
    """The records of a journal and the byte length of its complete lines (a run killed mid-write
    can leave a partial last line: it is ignored). A line that is not JSON is the user's to fix:
    the message says which, and that it is `what` that was expected."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    return parse_jsonl(data[:end].decode("utf-8", errors="replace"), path, what), end


def parse_jsonl(text: str, path: Path, what: str) -> list[dict[str, Any]]:
    """One record per "\n"-ended line. Not `str.splitlines`: it also splits at U+2028, U+2029
    and U+0085, which a file name or an item id may hold and `json.dumps(ensure_ascii=False)`
    writes as they are."""
    records = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            raise UsageError(f"{path} line {n} is not a {what}; fix or delete it")
        records.append(record)
    return records


class Journal:
    """This process's append-only record file, opened at the first write (a rank with nothing to
    do leaves no file)."""

    def __init__(self, path: Path, what: str) -> None:
        self.path, self.what = path, what
        self._file: io.BufferedWriter | None = None

    def write(self, records: Iterable[dict[str, Any]]) -> None:
        # a lone surrogate (a non-UTF-8 file name in an error message) goes out as its JSON escape
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8", "backslashreplace")
        try:
            if self._file is None:
                if self.path.exists():
                    os.truncate(self.path, read_journal(self.path, self.what)[1])
                self._file = open(self.path, "ab")
            self._file.write(lines)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:  # a full disk, a read-only folder
            raise WriteError(f"cannot write {self.path}: {e.strerror or e}") from None

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            # every write is flushed: close has only a failed write's rest to flush, and that write's
            # error (a full disk) is the one to report, not this second one
            with contextlib.suppress(OSError):
                file.close()


def torchrun_group() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, joining the gloo group the ranks meet in
    when there are several (once; ranks may end far apart, hence the long timeout)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=timedelta(hours=24))
    return rank, world


def leave_group() -> None:
    """Leave torchrun's process group together: a barrier first, so no rank tears its gloo
    threads down while another still talks to it (a SIGABRT at exit under load otherwise)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def share_items(options: LoadOptions) -> tuple[int, int, LoadOptions]:
    """(rank, world size, the options to load with) for a job that splits its *items* over
    torchrun's processes: each process loads a model of its own, on its own GPU, and takes every
    world-th item. Only `tp > 1` asks for the other split, one model over the processes, driven
    by rank 0: then rank 0 takes every item, (0, 1)."""
    if (options.tp or 1) > 1 or launched_by_torchrun() is None:
        return 0, 1, options
    rank, world = torchrun_group()
    device = options.device
    if world > 1 and device is None:
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    # tp=1: not the torchrun default of chat and serve, which split the model
    return rank, world, replace(options, tp=1, device=device)
