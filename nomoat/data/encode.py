"""Tokenization of document streams for shards: documents cut into pieces, grouped into encode_batch calls that
run in worker threads, and the resulting token arrays per split with their counts.

`encode_documents` serves both `build_shards` and recipes; the Ray engine's actors encode with `batch_pieces`,
so both engines cut the same batches. Not here: reading files (formats.py) or writing shards (shards.py).
"""

from __future__ import annotations

import collections
import functools
import hashlib
import itertools
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from nomoat.tokenizer import Tokenizer

CHUNK_CHARS = 1 << 16  # a long document is encoded in pieces of about this many characters
# Batches encoding at once: while one holds the GIL (turning Python strings into Rust ones and token lists back),
# the other's encoding runs on every core, so the cores idle less than under one bare encode_batch loop.
ENCODE_THREADS = 2
BATCH_CHARS = 1 << 22  # characters handed to one encode_batch call: enough to keep every core busy
# A split point after a newline that precedes a non-space is a pre-token boundary for GPT-2-style regexes.
_SPLIT_POINT = re.compile(r"(?<=\n)(?=\S)")
_PROBE = "Hello world.\nThe end, said he.\n\n  Indented\n'tis 42\n"


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


@dataclass
class Encoded:
    """A run of document pieces tokenized: each split's tokens in document order, EOS after each document."""

    tokens: dict[str, np.ndarray]  # split -> token ids, of the shards' dtype
    counts: dict[tuple[int, str], list[int]]  # (input index, split) -> [documents, bytes, tokens]


class Pieces:
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


def batch_pieces(
    documents: Iterable[tuple[int, str]],
    tokenizer: Tokenizer,
    splits: Sequence[str | None] | None,
    val_fraction: float,
    max_chars: float,
) -> Iterator[Pieces]:
    """Cut documents into pieces and group them into batches; a long document may span several batches.

    A document of input i goes to splits[i], or, where that is None (or `splits` is), to the split its content
    hashes to. The first batch is small, so that encoding starts soon; later ones grow to `max_chars`."""
    chunked = _chunking_is_exact(tokenizer)
    joiner = tokenizer.eos_token if _joining_is_exact(tokenizer) else None
    batch, budget = Pieces(joiner), min(max_chars, BATCH_CHARS // 16)
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
                batch, budget = Pieces(joiner), min(2 * budget, max_chars)
    if batch.parts:
        yield batch


def encode_documents(
    documents: Iterable[tuple[int, str]],
    tokenizer: Tokenizer,
    splits: Sequence[str | None] | None = None,
    val_fraction: float = 0.0005,
) -> Iterator[Encoded]:
    """Tokenize (input index, text) documents in batches, in order; see `batch_pieces` for the split of each.

    Batches encode in ENCODE_THREADS worker threads (the Rust library releases the GIL and uses every core) while
    this thread reads the next, and the caller writes the previous, so reading and writing hide behind encoding."""
    dtype = shard_dtype(tokenizer)
    with ThreadPoolExecutor(max_workers=ENCODE_THREADS) as pool:
        pending: collections.deque[Future[Encoded]] = collections.deque()
        for batch in batch_pieces(documents, tokenizer, splits, val_fraction, BATCH_CHARS):
            pending.append(pool.submit(batch.encode, tokenizer, dtype))
            if len(pending) > ENCODE_THREADS:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
