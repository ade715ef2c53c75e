"""Corpus files in: .txt, .jsonl, .jsonl.zst, .jsonl.gz and .parquet read as records with a string text field,
with the bytes read so far for progress bars; which files an input names, and the hash of an input's bytes.

JSON lines go through `nomoat.files.read_records`, so a bad line has one wording everywhere. Not here: what
happens to the documents (stages.py, encode.py), and downloading corpora.
"""

from __future__ import annotations

import gzip
import hashlib
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import zstandard

from nomoat.errors import UserError
from nomoat.files import file_sha256, read_records

SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".jsonl.gz", ".parquet")


def _suffix(path: Path) -> str | None:
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def input_files(path: Path) -> list[Path]:
    """The corpus files of an input: the file itself, or a folder's files with a corpus suffix, sorted."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
    if _suffix(path) is None:
        raise UserError(f"{path}: unknown corpus format; expected a folder or one of {', '.join(SUFFIXES)}")
    return [path]


def corpus_files(paths: Sequence[Path]) -> list[list[Path]]:
    """Each input's corpus files (`input_files`): the one rule of what `data build` and `tokenizer train` read.
    Inputs whose files hold no byte are a UserError naming them and what was looked for, before anything runs."""
    files = [input_files(path) for path in paths]  # fails fast on a missing input
    if not any(f.stat().st_size for group in files for f in group):
        names = ", ".join(map(str, paths))
        wanted = ", ".join(SUFFIXES[:-1]) + " or " + SUFFIXES[-1]
        raise UserError(f"no documents in {names}: no non-empty {wanted} file there; the corpus is empty")
    return files


def input_sha256(path: Path) -> str:
    """sha256 of a file's bytes; for a folder, of each corpus file's relative path and bytes, in order."""
    files = input_files(path)
    if not path.is_dir():
        return file_sha256(files[0])
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(file_sha256(file)))
    return h.hexdigest()


def _has_text(record: object, text_field: str) -> bool:
    return isinstance(record, dict) and isinstance(record.get(text_field), str)


def _no_text(where: str, text_field: str) -> UserError:
    return UserError(f'{where}: expected an object with a string "{text_field}" field')


def _read_txt(path: Path, text_field: str) -> Iterator[tuple[dict, int]]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from e
    if "\0" in text:
        raise UserError(f"{path}: binary data (a NUL byte at offset {data.index(0)}), not a text file")
    yield {text_field: text}, len(data)


def _read_parquet(path: Path, text_field: str) -> Iterator[tuple[dict, int]]:
    try:
        import pyarrow.parquet as pq  # optional: only parquet corpora need it
    except ImportError:
        raise UserError(f"{path}: reading parquet needs pyarrow; pip install 'nomoat[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
        rows, size, done = max(pf.metadata.num_rows, 1), path.stat().st_size, 0
        for batch in pf.iter_batches():
            for record in batch.to_pylist():
                done += 1
                if not _has_text(record, text_field):
                    raise _no_text(f"{path}: row {done}", text_field)
                yield record, size * done // rows
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid, for a corrupt file, is a ValueError
        raise UserError(f"{path}: not a readable parquet file ({e})") from e


class _Counted:
    """A file's raw lines, counting their bytes: a buffered file's tell() costs a system call per line, a
    quarter of the cost of parsing the line."""

    def __init__(self, lines: Iterable[bytes]) -> None:
        self.lines, self.pos = lines, 0

    def __iter__(self) -> Iterator[bytes]:
        for line in self.lines:
            self.pos += len(line)
            yield line


def _read_jsonl(
    path: Path, fmt: str, text_field: str, bad_lines: Callable[[str], None] | None
) -> Iterator[tuple[dict, int]]:
    with open(path, "rb") as raw:
        if fmt == "jsonl.zst":
            stream: Iterable[bytes] = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            stream = gzip.GzipFile(fileobj=raw) if fmt == "jsonl.gz" else raw
        counted = _Counted(raw) if stream is raw else None
        try:
            lines = stream if counted is None else counted
            for where, record in read_records(path, lines=lines, bad_lines=bad_lines):
                if not _has_text(record, text_field):
                    raise _no_text(where, text_field)
                yield record, counted.pos if counted is not None else raw.tell()
        except zstandard.ZstdError as e:
            raise UserError(f"{path}: corrupt zstd stream ({e})") from e
        except (gzip.BadGzipFile, EOFError) as e:
            raise UserError(f"{path}: corrupt gzip stream ({e})") from e


def read_corpus_file(
    path: Path,
    fmt: str | None = None,
    text_field: str = "text",
    bad_lines: Callable[[str], None] | None = None,
) -> Iterator[tuple[dict, int]]:
    """Yield (record, bytes of the file read so far): a .txt is one record {text_field: whole file}, a JSON-lines
    or parquet file one per line or row, each with a string `text_field`. `fmt` is one of SUFFIXES without the
    dot; None takes it from the file name. The byte count drives progress bars.

    A JSON line that does not parse is a UserError, or, given `bad_lines`, is passed to it as "path:line:
    reason" and skipped. A file with NUL bytes or bad UTF-8 is binary, not a corpus: always a UserError."""
    fmt = fmt or (_suffix(path) or "").lstrip(".")
    if fmt == "txt":
        yield from _read_txt(path, text_field)
    elif fmt == "parquet":
        yield from _read_parquet(path, text_field)
    elif fmt in ("jsonl", "jsonl.zst", "jsonl.gz"):
        yield from _read_jsonl(path, fmt, text_field, bad_lines)
    else:
        raise UserError(f"{path}: unknown corpus format {fmt!r}; expected one of {', '.join(SUFFIXES)}")


def read_documents(*paths: str | Path) -> Iterator[str]:
    """Documents of .txt files (the whole file), JSON lines or parquet (each record's "text"), or folders of them.
    The inputs are checked now, not at the first read: no corpus bytes in them is a UserError (`corpus_files`)."""
    files = [file for group in corpus_files([Path(p) for p in paths]) for file in group]
    return (record["text"] for file in files for record, _ in read_corpus_file(file))
