"""Token shards out: `train_*.bin` / `val_*.bin` and manifest.json written atomically, the manifest read back, and
the check that shards match a tokenizer; `build_shards` reads, encodes and writes corpus files in one call.

Shards are raw little-endian token arrays (uint16 or uint32), each document followed by EOS, so the loader
can memory-map them. The manifest records what went in (file hashes, counts) so a run can name its data.
Not here: reading formats (formats.py), tokenization (encode.py), filtering (recipes), batching (loader.py).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nomoat.data.encode import Encoded, encode_documents, shard_dtype
from nomoat.data.formats import corpus_files, input_sha256, read_corpus_file
from nomoat.errors import UserError
from nomoat.files import BadLines, atomic_folder
from nomoat.tokenizer import EOS_CANDIDATES, Tokenizer

FORMAT_VERSION = 1


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
    with atomic_folder(out_dir) as tmp:
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
    files = corpus_files(paths)  # before the progress bar, so that an empty corpus's error is the only line
    total = sum(f.stat().st_size for fs in files for f in fs)
    records = [{"path": str(path), "sha256": input_sha256(path), "bad_lines": 0} for path in paths]
    log = BadLines()

    def documents(bar: tqdm) -> Iterator[tuple[int, str]]:
        for i, group in enumerate(files):

            def skip(message: str, record: dict = records[i]) -> None:
                record["bad_lines"] += 1
                log(message)

            for file in group:
                read = 0
                for doc, pos in read_corpus_file(file, bad_lines=None if strict else skip):
                    bar.update(pos - read)  # counts bytes read, a batch of documents ahead of the tokenizer
                    read = pos
                    yield i, doc["text"]

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
