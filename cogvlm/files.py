"""Writing files so that nobody ever sees half of one: the content goes to a temporary file
next to the target, which is renamed over the target once complete (a rename within one folder
is atomic). Every writer of results, captions, shards, data sets and drawings goes through here."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import WriteError


def temp_path(target: Path) -> Path:
    """Fixed per target, so a rerun that redoes the target replaces what a killed run left (and
    a resuming job can tell a target that was being written from one never started)."""
    return target.with_name(f".{target.name}.tmp")


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path to write `target`'s content to: renamed over `target` when the block ends
    normally, removed when it raises. Created by the caller, so it gets the user's umask (a
    `mkstemp` file would be private to them)."""
    tmp = temp_path(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def printable(name: str) -> str:
    """A name from a file system or an archive as text: bytes that were not UTF-8 (which Python
    keeps as lone surrogates, surrogateescape) as \\xNN escapes, so a record, a Parquet string or
    a report can hold it. The same name always gives the same text, so a resume finds it again."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def write_text(target: Path, text: str) -> None:
    """`text` as the whole of `target`, on disk (fsync) before it replaces the old file. A lone
    surrogate (a non-UTF-8 file name in a message) is written as its \\uXXXX escape."""
    try:
        with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", errors="backslashreplace", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteError(f"cannot write {target}: {e.strerror or e}") from None
