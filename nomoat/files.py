"""Ground-floor file helpers that every layer shares: finished folders and files published atomically, file
hashes, and one reader of JSON records with one wording for a bad line.

Here so that no layer borrows them from another (the data layer from the checkpoint layer, say). Not here:
what goes inside those files (checkpoint.py, data/shards.py, convert/) or reading compressed corpora
(data/formats.py, which feeds its decompressed lines to `read_records`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from nomoat.errors import UserError


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fsync_tree(folder: Path) -> None:
    """Flush every file so that a rename never publishes a half-written folder after a power loss."""
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def replace_folder(src: Path, dst: Path) -> None:
    """Move a finished folder src to dst; an existing dst is renamed aside first and removed only afterwards."""
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block ends cleanly its files are flushed and it
    replaces `out`, and when it raises it is removed, so `out` is only ever absent, the old one or the new one."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """A temporary path beside `out` that replaces it once the block ends cleanly (the caller fsyncs it), and
    is removed if the block raises, so `out` is only ever absent, the old file or the whole new one."""
    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(out: str | Path, text: str) -> Path:
    """Write a text file whole or not at all: through atomic_file, flushed to disk before it replaces `out`."""
    with atomic_file(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    return Path(out)


class BadLines:
    """The skip-and-count mode of `read_records`: each bad line is counted, the first `shown` are named on
    stderr, and `close` says how many more were skipped."""

    def __init__(self, shown: int = 10):
        self.shown, self.total = shown, 0

    def __call__(self, message: str) -> None:
        self.total += 1
        if self.total <= self.shown:
            print(f"warning: {message}; skipped", file=sys.stderr)

    def close(self) -> None:
        if self.total > self.shown:
            print(f"warning: {self.total - self.shown} more bad lines skipped, {self.total} in all", file=sys.stderr)


def parse_json(text: str, where: str) -> Any:
    """One JSON value; the one wording for one that does not parse."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None


def read_json(path: str | Path, missing: str = "no such file") -> Any:
    """A whole JSON file; a missing, binary or malformed one is one line naming it (`missing` says what the
    file should have been)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: {missing}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: binary data (not UTF-8), not a JSON file") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_records(
    path: str | Path, lines: Iterable[bytes] | None = None, bad_lines: Callable[[str], None] | None = None
) -> Iterator[tuple[str, Any]]:
    """(where, record) for each JSON line of a file (`where` is `file:line`), or for each item of a `.json`
    array (`file[i]`). Blank lines are skipped; a file with NUL bytes or bad UTF-8 is binary, never a record
    file. A line that is not JSON stops the read (strict), or is passed to `bad_lines` (a BadLines, say) and skipped.

    `lines` are the file's raw lines when the caller has opened it (a decompressed stream, say)."""
    path = Path(path)
    if lines is None and not path.is_file():
        raise UserError(f"{path}: no such file")
    if lines is None and path.suffix == ".json":
        yield from _json_array(path)
        return
    with contextlib.ExitStack() as stack:
        if lines is None:
            lines = stack.enter_context(open(path, "rb"))
        for lineno, line in enumerate(lines, 1):
            if line.isspace() or not line:
                continue
            where = f"{path}:{lineno}"
            try:
                # Decoding first skips json's encoding sniffing, and a binary file fails here, not as JSON.
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: binary data (not UTF-8), not a JSON-lines file") from None
            if "\0" in text:
                raise UserError(f"{where}: binary data (a NUL byte), not a JSON-lines file")
            try:
                record = parse_json(text, where)
            except UserError as e:
                if bad_lines is None:
                    raise
                bad_lines(str(e))
                continue
            yield where, record


def _json_array(path: Path) -> Iterator[tuple[str, Any]]:
    records = read_json(path)
    if not isinstance(records, list):
        raise UserError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    for i, record in enumerate(records):
        yield f"{path}[{i}]", record
