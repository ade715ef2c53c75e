"""Corpus to token shards: read documents, tokenize them, write `train_*.bin` / `val_*.bin` and manifest.json.

Shards are raw little-endian token arrays (uint16 or uint32), each document followed by EOS, so the loader
can memory-map them. The manifest records what went in (file hashes, counts) so a run can name its data.
`encode_documents` tokenizes any stream of documents (recipe.py feeds it cleaned ones), `write_shards` writes the
encoded batches, `build_shards` does both for files.
Not here: downloading corpora, deduplication or filtering; batching lives in loader.py.
"""

from __future__ import annotations

import collections
import functools
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard
from tqdm import tqdm

from nomoat.errors import UserError
from nomoat.files import file_sha256, replace_folder
from nomoat.tokenizer import EOS_CANDIDATES, Tokenizer

FORMAT_VERSION = 1
SUFFIXES = (".txt", ".jsonl", ".jsonl.zst", ".jsonl.gz", ".parquet")
CHUNK_CHARS = 1 << 16  # a long document is encoded in pieces of about this many characters
# Batches encoding at once: while one holds the GIL (turning Python strings into Rust ones and token lists back),
# the other's encoding runs on every core, so the cores idle less than under one bare encode_batch loop.
ENCODE_THREADS = 2
BATCH_CHARS = 1 << 22  # characters handed to one encode_batch call: enough to keep every core busy
# A split point after a newline that precedes a non-space is a pre-token boundary for GPT-2-style regexes.
_SPLIT_POINT = re.compile(r"(?<=\n)(?=\S)")
_PROBE = "Hello world.\nThe end, said he.\n\n  Indented\n'tis 42\n"


def _suffix(path: Path) -> str | None:
    return next((s for s in SUFFIXES if path.name.endswith(s)), None)


def _input_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p))
    if _suffix(path) is None:
        raise UserError(f"{path}: unknown corpus format; expected a folder or one of {', '.join(SUFFIXES)}")
    return [path]


def _text_record(record: object, text_field: str, path: Path, where: str, k: int) -> dict:
    """`record` if it holds a string `text_field`; the error names path and `where`.format(k), built only then."""
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise UserError(f'{path}{where.format(k)}: expected an object with a string "{text_field}" field')
    return record


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
                yield _text_record(record, text_field, path, ": row {}", done), size * done // rows
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid, for a corrupt file, is a ValueError
        raise UserError(f"{path}: not a readable parquet file ({e})") from e


def read_records(
    path: Path,
    fmt: str | None = None,
    text_field: str = "text",
    on_bad_line: Callable[[str], None] | None = None,
) -> Iterator[tuple[dict, int]]:
    """Yield (record, bytes of the file read so far): a .txt is one record {text_field: whole file}, a JSON-lines
    or parquet file one per line or row, each with a string `text_field`. `fmt` is one of SUFFIXES without the
    dot; None takes it from the file name. The byte count drives progress bars.

    A JSON line that does not parse is a UserError, or, given `on_bad_line`, is passed to it as "path:line:
    reason" and skipped. A file with NUL bytes or bad UTF-8 is binary, not a corpus: always a UserError."""
    fmt = fmt or (_suffix(path) or "").lstrip(".")
    if fmt == "txt":
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from e
        if "\0" in text:
            raise UserError(f"{path}: binary data (a NUL byte at offset {data.index(0)}), not a text file")
        yield {text_field: text}, len(data)
        return
    if fmt == "parquet":
        yield from _read_parquet(path, text_field)
        return
    if fmt not in ("jsonl", "jsonl.zst", "jsonl.gz"):
        raise UserError(f"{path}: unknown corpus format {fmt!r}; expected one of {', '.join(SUFFIXES)}")
    with open(path, "rb") as raw:
        if fmt == "jsonl.zst":
            lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
        else:
            lines = gzip.GzipFile(fileobj=raw) if fmt == "jsonl.gz" else raw
        try:
            pos = 0
            for lineno, line in enumerate(lines, 1):
                # Counting bytes: a buffered file's tell() costs a system call per line, a quarter of json.loads.
                pos = pos + len(line) if lines is raw else raw.tell()
                if line.isspace():  # never empty: a line keeps its newline
                    continue
                try:
                    # Decoding first skips json's encoding sniffing, and a binary file fails here, not as JSON.
                    text = line.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"{path}:{lineno}: binary data (not UTF-8), not a JSON-lines file") from e
                if "\0" in text:
                    raise UserError(f"{path}:{lineno}: binary data (a NUL byte), not a JSON-lines file")
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    if on_bad_line is None:
                        raise UserError(f"{path}:{lineno}: not a JSON line ({e})") from e
                    on_bad_line(f"{path}:{lineno}: not a JSON line ({e})")
                    continue
                yield _text_record(record, text_field, path, ":{}", lineno), pos
        except zstandard.ZstdError as e:
            raise UserError(f"{path}: corrupt zstd stream ({e})") from e
        except (gzip.BadGzipFile, EOFError) as e:
            raise UserError(f"{path}: corrupt gzip stream ({e})") from e


class BadLineLog:
    """Counts skipped JSON lines and warns about each of the first `shown` on stderr, then about the rest."""

    def __init__(self, shown: int = 10):
        self.shown, self.total = shown, 0

    def __call__(self, message: str) -> None:
        self.total += 1
        if self.total <= self.shown:
            print(f"warning: {message}; skipped", file=sys.stderr)

    def close(self) -> None:
        if self.total > self.shown:
            print(f"warning: {self.total - self.shown} more bad lines skipped, {self.total} in all", file=sys.stderr)


def _read_file(path: Path, on_bad_line: Callable[[str], None] | None = None) -> Iterator[tuple[str, int]]:
    for record, pos in read_records(path, on_bad_line=on_bad_line):
        yield record["text"], pos


def read_documents(path: str | Path) -> Iterator[str]:
    """Documents of a .txt (the whole file), .jsonl or .jsonl.zst (each line's "text"), or a folder."""
    for file in _input_files(Path(path)):
        for doc, _ in _read_file(file):
            yield doc


def _input_sha256(path: Path) -> str:
    """sha256 of a file's bytes; for a folder, of each corpus file's relative path and bytes, in order."""
    files = _input_files(path)
    if not path.is_dir():
        return file_sha256(files[0])
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path).as_posix().encode() + b"\0")
        h.update(bytes.fromhex(file_sha256(file)))
    return h.hexdigest()


def _chunks(text: str) -> list[str]:
    """Cut a long document after newlines so no encode call sees more than about CHUNK_CHARS characters."""
    pieces, start = [], 0
    while len(text) - start > CHUNK_CHARS:
        m = _SPLIT_POINT.search(text, start + CHUNK_CHARS)
        if m is None:
            break
        pieces.append(text[start : m.end()])
        start = m.end()
    pieces.append(text[start:])
    return pieces


@functools.lru_cache(maxsize=8)  # probed once per tokenizer, not once per batch
def _chunking_is_exact(tokenizer: Tokenizer) -> bool:
    # True for byte-level BPE with a GPT-2/Llama-3-style regex; false for e.g. SentencePiece-style tokenizers
    # that prepend "▁" to every encode call. Then long documents are encoded whole: slower, never wrong.
    return sum(tokenizer.encode_batch(_SPLIT_POINT.split(_PROBE)), []) == tokenizer.encode(_PROBE)


@functools.lru_cache(maxsize=8)
def _joining_is_exact(tokenizer: Tokenizer) -> bool:
    """Whether documents joined by the EOS token's text encode as each document followed by EOS. True where EOS is
    a special token split off before pre-tokenization (GPT-2, Llama 3); false e.g. where it strips the whitespace
    around it, or a SentencePiece-style tokenizer marks only an input's first word. Then each document is its
    own encode input: slower, never wrong."""
    if tokenizer.eos_token is None:
        return False
    docs = [*_SPLIT_POINT.split(_PROBE), " lead", "trail \n\n"]
    joined = [t for ids in tokenizer.encode_batch(docs) for t in [*ids, tokenizer.eos_id]][:-1]
    return tokenizer.encode(tokenizer.eos_token.join(docs)) == joined


def _in_val(data: bytes, val_fraction: float) -> bool:
    # Content-based: a document's split does not depend on file order, and duplicates land together.
    return int.from_bytes(hashlib.sha256(data).digest(), "big") / 2**256 < val_fraction


class _ShardWriter:
    """Appends tokens to `{split}_000000.bin`, `{split}_000001.bin`, ... of at most `shard_tokens` each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None
        self.hash = hashlib.sha256()  # of the open shard
        self.documents = self.tokens = self.bytes = 0

    def write(self, ids: np.ndarray) -> None:
        """Append `ids`, already of this writer's dtype."""
        while len(ids):
            if self.file is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self.file = open(self.out_dir / name, "wb")
                self.shards.append({"file": name, "tokens": 0})
                self.hash = hashlib.sha256()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            data = ids[:room].tobytes()
            self.file.write(data)
            self.hash.update(data)
            self.shards[-1]["tokens"] += min(room, len(ids))
            self.tokens += min(room, len(ids))
            ids = ids[room:]
            if self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.shards[-1]["sha256"] = self.hash.hexdigest()
            self.file = None

    def summary(self) -> dict:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "shards": self.shards,
        }


@dataclass
class Encoded:
    """A run of document pieces tokenized: each split's tokens in document order, EOS after each document."""

    tokens: dict[str, np.ndarray]  # split -> token ids, of the shards' dtype
    counts: dict[tuple[int, str], list[int]]  # (input index, split) -> [documents, bytes, tokens]


class _Pieces:
    """Pieces of documents waiting for one encode_batch call, and what each belongs to.

    Where `joiner` (the EOS token's text) is given, consecutive short documents of one input and split form one
    encode input, joined by it: one Encoding and one list of ids for many documents, where the Python side of
    each costs about as much as encoding a short document."""

    def __init__(self, joiner: str | None) -> None:
        self.joiner = joiner
        self.parts: list[list[str]] = []  # each entry is one encode input: its parts joined by `joiner`
        self.owners: list[tuple[int, str, bool]] = []  # (input index, split, entry ends a document)
        self.counts: dict[tuple[int, str], list[int]] = {}
        self.chars = 0
        self.open_chars = -1  # characters in the last entry while it may take another whole document

    def add(self, i: int, split: str, piece: str, last: bool, whole: bool) -> None:
        if (
            whole
            and self.joiner is not None
            and 0 <= self.open_chars <= CHUNK_CHARS - len(piece)
            and self.owners[-1][:2] == (i, split)
        ):
            self.parts[-1].append(piece)
            self.open_chars += len(piece)
        else:
            self.parts.append([piece])
            self.owners.append((i, split, last))
            self.open_chars = len(piece) if whole else -1
        self.chars += len(piece)

    def encode(self, tokenizer: Tokenizer, dtype: np.dtype) -> Encoded:
        """Encode every piece; runs in a worker thread or a Ray worker, so the caller only writes."""
        eos = tokenizer.eos_id
        per_split: dict[str, list[list[int]]] = {}
        texts = [(self.joiner or "").join(parts) for parts in self.parts]  # without a joiner, one part each
        for (i, split, last), ids in zip(self.owners, tokenizer.encode_batch(texts), strict=True):
            if last:
                ids.append(eos)
            per_split.setdefault(split, []).append(ids)
            self.counts.setdefault((i, split), [0, 0, 0])[2] += len(ids)
        # One array per split from a flat iterator: measured faster than list concatenation or np.concatenate.
        tokens = {
            split: np.fromiter(itertools.chain.from_iterable(ids), dtype, count=sum(map(len, ids)))
            for split, ids in per_split.items()
        }
        return Encoded(tokens, self.counts)


def shard_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype("<u2" if tokenizer.vocab_size <= 2**16 else "<u4")


def _pieces(
    documents: Iterable[tuple[int, str]],
    tokenizer: Tokenizer,
    splits: Sequence[str | None] | None,
    val_fraction: float,
    max_chars: float,
) -> Iterator[_Pieces]:
    """Cut documents into pieces and group them into batches; a long document may span several batches.

    A document of input i goes to splits[i], or, where that is None (or `splits` is), to the split its content
    hashes to. The first batch is small, so that encoding starts soon; later ones grow to `max_chars`."""
    chunked = _chunking_is_exact(tokenizer)
    joiner = tokenizer.eos_token if _joining_is_exact(tokenizer) else None
    batch, budget = _Pieces(joiner), min(max_chars, BATCH_CHARS // 16)
    for i, text in documents:
        if not text:
            continue  # an empty document would add nothing but a lone EOS
        data = text.encode()
        split = (splits and splits[i]) or ("val" if _in_val(data, val_fraction) else "train")
        count = batch.counts.setdefault((i, split), [0, 0, 0])
        count[0] += 1
        count[1] += len(data)
        doc_pieces = _chunks(text) if chunked and len(text) > CHUNK_CHARS else [text]
        for j, piece in enumerate(doc_pieces):
            batch.add(i, split, piece, j == len(doc_pieces) - 1, len(doc_pieces) == 1)
            if batch.chars >= budget:
                yield batch
                batch, budget = _Pieces(joiner), min(2 * budget, max_chars)
    if batch.parts:
        yield batch


def encode_documents(
    documents: Iterable[tuple[int, str]],
    tokenizer: Tokenizer,
    splits: Sequence[str | None] | None = None,
    val_fraction: float = 0.0005,
) -> Iterator[Encoded]:
    """Tokenize (input index, text) documents in batches, in order; see `_pieces` for the split of each.

    Batches encode in ENCODE_THREADS worker threads (the Rust library releases the GIL and uses every core) while
    this thread reads the next, and the caller writes the previous, so reading and writing hide behind encoding."""
    dtype = shard_dtype(tokenizer)
    with ThreadPoolExecutor(max_workers=ENCODE_THREADS) as pool:
        pending: collections.deque[Future[Encoded]] = collections.deque()
        for batch in _pieces(documents, tokenizer, splits, val_fraction, BATCH_CHARS):
            pending.append(pool.submit(batch.encode, tokenizer, dtype))
            if len(pending) > ENCODE_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _check_output(tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float, shard_tokens: int) -> Path:
    """Fail before any work on arguments that would fail the build; return out_dir resolved."""
    if tokenizer.eos_id is None:
        raise UserError(f"the tokenizer has no end-of-document token (none of {', '.join(EOS_CANDIDATES)})")
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = Path(out_dir).resolve()  # so that `.parent` and `.name` are real, even for "."
    # Replacing a folder means deleting it: only ever delete one that we built.
    if out_dir.exists() and (
        not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "manifest.json").is_file())
    ):
        raise UserError(f"{out_dir}: exists and is not a shard folder (no manifest.json); not replacing it")
    return out_dir


def write_shards(
    batches: Iterable[Encoded],
    inputs: Sequence[dict],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_inputs: Sequence[dict] = (),
    val_fraction: float = 0.0005,
    shard_tokens: int = 100_000_000,
    finish: Callable[[Path, dict], None] | None = None,
) -> dict:
    """Write encoded batches, in order, as shards in `out_dir` (replaced atomically); return the manifest.

    `batches` come from `encode_documents` (or the Ray engine's workers). `inputs` and `val_inputs` are the
    manifest's records of where documents came from (e.g. {"path", "sha256"}), read after the last batch, so a
    reader may count into them as it goes (bad_lines). Input index i counts towards inputs[i], or
    val_inputs[i - len(inputs)]. `val_fraction` is recorded (None with `val_inputs`) and checked, not applied.
    `finish(folder, manifest)` may add files to the folder before it replaces `out_dir`.
    """
    out_dir = _check_output(tokenizer, out_dir, val_fraction, shard_tokens)
    names = ", ".join(str(r["path"]) for r in [*inputs, *val_inputs])
    dtype = shard_dtype(tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a crashed build by a process with our pid
    tmp.mkdir()
    try:
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in ("train", "val")}
        stats = [{"documents": 0, "tokens": 0, "bytes": 0} for _ in [*inputs, *val_inputs]]
        for batch in batches:
            for split, ids in batch.tokens.items():
                writers[split].write(ids)
            for (i, split), (documents, size, tokens) in batch.counts.items():
                writers[split].documents += documents
                writers[split].bytes += size
                stats[i]["documents"] += documents
                stats[i]["bytes"] += size
                stats[i]["tokens"] += tokens
        for w in writers.values():
            w.close()
        # The records are read only now: a reader may have counted into them (bad_lines) as it went.
        stats = [{**r, **st} for r, st in zip([*inputs, *val_inputs], stats, strict=True)]
        if writers["train"].documents + writers["val"].documents == 0:
            raise UserError(f"no documents in {names}: the corpus is empty")
        if writers["train"].tokens == 0:
            raise UserError(f"train split empty: every document of {', '.join(str(r['path']) for r in inputs)} is val")
        if writers["val"].tokens == 0 and (val_inputs or val_fraction > 0):
            warnings.warn(f"{out_dir}: empty val split; pass val_inputs or more documents", stacklevel=3)
        manifest = {
            "format_version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.sha256,
            "val_fraction": None if val_inputs else val_fraction,
            "inputs": stats[: len(inputs)],
            "val_inputs": stats[len(inputs) :],
            "splits": {split: w.summary() for split, w in writers.items()},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if finish is not None:
            finish(tmp, manifest)
        replace_folder(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def build_shards(
    inputs: Sequence[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_inputs: Sequence[str | Path] = (),
    val_fraction: float = 0.0005,
    shard_tokens: int = 100_000_000,
    progress: bool = True,
    strict: bool = False,
) -> dict:
    """Tokenize the files of `inputs` and `val_inputs` into shards in `out_dir`; see `write_shards`.

    Same inputs and tokenizer give byte-identical files. Tokenization runs on all cores in the Rust library;
    set RAYON_NUM_THREADS before the first encode to use fewer. A JSON line that does not parse is skipped with
    a warning and counted in its input's `bad_lines`, or, with `strict`, stops the build.
    """
    _check_output(tokenizer, out_dir, val_fraction, shard_tokens)
    if not inputs:
        raise UserError("no corpus inputs given")
    paths = [Path(p) for p in [*inputs, *val_inputs]]
    files = [_input_files(path) for path in paths]  # fails fast on a missing input
    total = sum(f.stat().st_size for fs in files for f in fs)
    if total == 0:  # before the progress bar, so the error stays the only line printed
        raise UserError(f"no documents in {', '.join(map(str, paths))}: the corpus is empty")
    records = [{"path": str(path), "sha256": _input_sha256(path), "bad_lines": 0} for path in paths]
    log = BadLineLog()

    def documents(bar: tqdm) -> Iterator[tuple[int, str]]:
        for i, input_files in enumerate(files):

            def skip(message: str, record: dict = records[i]) -> None:
                record["bad_lines"] += 1
                log(message)

            for file in input_files:
                read = 0
                for text, pos in _read_file(file, None if strict else skip):
                    bar.update(pos - read)  # counts bytes read, a batch of documents ahead of the tokenizer
                    read = pos
                    yield i, text

    try:
        with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
            splits = [None if not val_inputs else "train"] * len(inputs) + ["val"] * len(val_inputs)
            return write_shards(
                encode_documents(documents(bar), tokenizer, splits, val_fraction),
                records[: len(inputs)],
                tokenizer,
                out_dir,
                val_inputs=records[len(inputs) :],
                val_fraction=val_fraction,
                shard_tokens=shard_tokens,
            )
    finally:
        log.close()


def load_manifest(shard_dir: str | Path) -> dict:
    path = Path(shard_dir) / "manifest.json"
    if not Path(shard_dir).is_dir():
        raise UserError(f"{shard_dir}: no such shard folder")
    if not path.is_file():
        raise UserError(f"{path}: missing; build the shards first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: not a format_version {FORMAT_VERSION} shard manifest")
    return manifest


def check_tokenizer_matches(manifest: dict, tokenizer: Tokenizer, where: str) -> None:
    """Refuse to train on shards made by a different tokenizer: the ids would silently mean other tokens."""
    if manifest["vocab_size"] != tokenizer.vocab_size or manifest["tokenizer_sha256"] != tokenizer.sha256:
        raise UserError(
            f"{where}: shards were built with tokenizer sha256 {manifest['tokenizer_sha256'][:12]} "
            f"(vocab {manifest['vocab_size']}), but the tokenizer is sha256 {tokenizer.sha256[:12]} "
            f"(vocab {tokenizer.vocab_size})"
        )
