"""Small file helpers: atomic writes and crash-safe JSONL appends.

Why: every stage of the pipeline writes files a later run resumes from, so a kill at any moment
must leave either the old file or the new one, never half of either.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, read a megabyte at a time: names exactly which data a result came from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def replace_dir(tmp_dir: str | os.PathLike, final_dir: str | os.PathLike) -> None:
    """Move a fully written `tmp_dir` to `final_dir`, replacing any old one."""
    final_dir = Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    shutil.rmtree(old, ignore_errors=True)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file, however spelt (relative, `..`, a link to it)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet): compare where they would be
        return os.path.realpath(a) == os.path.realpath(b)


def is_whole_json(line: bytes) -> bool:
    """Whether a last line without its newline is a whole record (it parses: a hand-edited file, a
    write cut just before its newline) rather than a killed writer's half line. A JSON object that
    parses cannot be the beginning of a longer one, so the test never takes half a record for one."""
    try:
        json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False
    return True


def last_line_start(path: str | os.PathLike, block: int = 1 << 16) -> int:
    """Where the file's last line begins (its size when it ends with a newline): searched from the
    end, so a long output is not read whole to repair its tail."""
    with open(path, "rb") as f:
        position = f.seek(0, os.SEEK_END)
        while position > 0:
            step = min(block, position)
            f.seek(position - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                return position - step + newline + 1
            position -= step
    return 0


def repair_jsonl_tail(path: str | os.PathLike) -> None:
    """Finish a last line left without its newline, so appends start on a clean line: a killed
    writer's half line is dropped, a whole record (`is_whole_json`) gets its newline. Readers that
    resume (`blsp.data.read_jsonl(partial_tail=True)`) count exactly the records this keeps.

    Call it only once the run is known to be valid: a refused run must leave the file as it was.
    The repaired file is written aside and renamed over the old one, so a crash or a full disk
    mid-repair leaves the old file whole, never a half-copied one."""
    path = Path(path)
    if not path.exists():
        return
    size, cut = path.stat().st_size, last_line_start(path)
    if cut == size:
        return
    with open(path, "rb") as f:
        f.seek(cut)
        tail = f.read()
    ending = tail + b"\n" if is_whole_json(tail) else b""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
            copy_bytes(src, out, cut)
            out.write(ending)
            out.flush()
            os.fsync(out.fileno())
        shutil.copymode(path, tmp)  # mkstemp's file is private: the repaired one keeps the old one's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_bytes(src, dst, count: int, block: int = 1 << 20) -> None:
    """The first `count` bytes of `src` into `dst`, a megabyte at a time."""
    while count > 0:
        data = src.read(min(block, count))
        if not data:
            raise OSError(f"{src.name}: ended {count} byte(s) early (changed while being copied)")
        dst.write(data)
        count -= len(data)


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records as one write, flushed and fsynced: a kill loses at most this batch."""
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if not payload:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
