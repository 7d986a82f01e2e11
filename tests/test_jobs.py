"""The journal the resumable jobs (caption, eval) share: whole records survive a kill and any
character a file name or item id may hold."""

from __future__ import annotations

import pytest

from cogvlm.errors import UsageError
from cogvlm.jobs import Journal, read_journal

NAMES = ["plain.jpg", "line\u2028sep.jpg", "para\u2029sep.jpg", "next\u0085line.jpg", "tab\there.jpg", "é.jpg"]


def test_records_with_unicode_line_separators_read_back_whole(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, "record")
    journal.write({"image": n, "caption": f"caption of {n}"} for n in NAMES)
    journal.close()
    records, end = read_journal(path, "record")
    assert [r["image"] for r in records] == NAMES and end == path.stat().st_size


def test_a_partial_last_line_is_ignored_then_cut_before_appending(tmp_path):
    path = tmp_path / "journal.jsonl"
    journal = Journal(path, "record")
    journal.write([{"id": "a\u2028b", "prediction": "yes"}])
    journal.close()
    with open(path, "a", encoding="utf-8") as f:  # what a kill in the middle of a write leaves
        f.write('{"id": "c", "predic')
    assert read_journal(path, "record")[0] == [{"id": "a\u2028b", "prediction": "yes"}]
    journal = Journal(path, "record")
    journal.write([{"id": "c", "prediction": "no"}])
    journal.close()
    assert [r["id"] for r in read_journal(path, "record")[0]] == ["a\u2028b", "c"]


def test_a_line_that_is_not_a_record_names_the_file_and_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(UsageError, match=r"journal.jsonl line 2 is not a prediction record; fix or delete it"):
        read_journal(path, "prediction record")
