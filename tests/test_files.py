"""cogvlm.files: every result file appears whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from cogvlm.files import atomic_path, temp_path, write_text


def test_write_text_replaces_the_file_whole(tmp_path):
    target = tmp_path / "report.json"
    write_text(target, "old\n")
    write_text(target, "new ünïcode\r\n")  # newlines kept as given, UTF-8
    assert target.read_bytes() == "new ünïcode\r\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "captions.jsonl"
    target.write_text("done\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half of")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "done\n"
    assert not temp_path(target).exists()


def test_a_leftover_temporary_is_replaced_by_the_rerun(tmp_path):
    target = tmp_path / "shard-0.parquet"
    temp_path(target).write_text("what a killed run left")  # SIGKILL skips every cleanup
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"PAR1")
    assert target.read_bytes() == b"PAR1" and not temp_path(target).exists()


def test_files_get_the_users_umask_not_a_private_mode(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


def test_a_target_that_cannot_be_written_gives_one_named_error(tmp_path):
    from cogvlm.files import WriteError

    not_a_folder = tmp_path / "results"
    not_a_folder.write_text("a file where a folder should be")  # fails for root too
    with pytest.raises(WriteError, match=r"^cannot write .*results/report\.md: Not a directory$"):
        write_text(not_a_folder / "report.md", "x")
