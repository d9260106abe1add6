"""File helpers: the repair of a killed writer's last line is atomic and keeps every whole record."""

from __future__ import annotations

import os

import pytest

import blsp.io
from blsp.io import repair_jsonl_tail


def leftovers(directory) -> list[str]:
    """Files a repair may have left beside the one it repaired (its temporary copy)."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_half_line_is_cut_on_a_copy_renamed_over_the_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}\n{"id": 3, "predi')
    os.chmod(path, 0o644)
    inode = path.stat().st_ino
    repair_jsonl_tail(path)
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'
    assert path.stat().st_ino != inode  # written aside and renamed, not truncated in place
    assert path.stat().st_mode & 0o777 == 0o644  # the file's permissions survive the rename
    assert leftovers(tmp_path) == []


def test_a_repair_that_fails_leaves_the_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    before = b'{"id": 1}\n{"id": 2, "predi'
    path.write_bytes(before)

    def refused(*args):
        raise OSError("disk full")

    monkeypatch.setattr(blsp.io.os, "replace", refused)
    with pytest.raises(OSError, match="disk full"):
        repair_jsonl_tail(path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == []


def test_a_whole_last_record_without_its_newline_is_kept_and_finished(tmp_path):
    """A last line that parses is a complete record (a hand-edited file, a write cut just before
    its newline): readers count it as written, so the repair must not drop it."""
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2}')
    repair_jsonl_tail(path)
    assert path.read_bytes() == b'{"id": 1}\n{"id": 2}\n'


@pytest.mark.parametrize("content", [b"", b'{"id": 1}\n', b'{"id": 1}\n\n'])
def test_a_finished_file_is_not_rewritten(tmp_path, content):
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
    repair_jsonl_tail(path)
    assert (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) == (content, inode, mtime)
    repair_jsonl_tail(tmp_path / "absent.jsonl")
    assert not (tmp_path / "absent.jsonl").exists()


def test_a_long_file_is_repaired_by_its_last_newline(tmp_path):
    """The last newline is searched from the end in blocks: one far from the end is found too."""
    path = tmp_path / "out.jsonl"
    head = b"".join(b'{"id": %d}\n' % i for i in range(20000))
    path.write_bytes(head + b'{"text": "' + b"x" * 300000)
    repair_jsonl_tail(path)
    assert path.read_bytes() == head
