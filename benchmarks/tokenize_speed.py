"""Throughput of `nomoat.data.build_shards` against a bare Hugging Face `tokenizers` encode loop, in MB/s.

The corpus is copies of Tiny Shakespeare: `--copies` whole-file .txt documents in a folder plus a .jsonl of the
same text cut into paragraph documents, in a temporary folder. Both sides use one byte-level BPE (trained on a
slice) and the same text, batched by the builder's character budget. The bare loop encodes each document as its
own input (a long one cut as the builder cuts it), from preloaded strings, and keeps nothing; the builder also
reads, hashes and writes shards. The builder joins short documents around the EOS token into fewer inputs, which
the library encodes faster, so a second bare loop over the builder's own inputs shows the overhead alone.
Not here: multi-process builds, other tokenizer types, cold caches. The issue calls this benchmarks/tokenize.py;
that name would shadow Python's own `tokenize` module (imported by `inspect`, `linecache`...) for a script run
from benchmarks/, since a script's folder comes first on sys.path.
Usage: `python benchmarks/tokenize_speed.py [--copies 16] [--threads 2] [--profile] [--json]`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from nomoat.data import build_shards, read_documents
from nomoat.data.encode import BATCH_CHARS, _chunking_is_exact, _chunks
from nomoat.data.encode import batch_pieces as _pieces
from nomoat.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).resolve().parent.parent / "nomoat" / "assets" / "tinyshakespeare.txt"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--copies", type=int, default=16, help="copies of Tiny Shakespeare in each of .txt and .jsonl")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--train-chars", type=int, default=300_000, help="slice the tokenizer is trained on")
    p.add_argument("--threads", type=int, default=2, help="RAYON_NUM_THREADS for the Rust tokenizer")
    p.add_argument("--repeats", type=int, default=3, help="best of this many timed runs per side")
    p.add_argument("--profile", action="store_true", help="print where the builder's time goes")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def write_corpus(root: Path, copies: int) -> Path:
    """root/corpus/{txt/NNN.txt, paragraphs.jsonl}: whole-file documents and paragraph documents."""
    text = SHAKESPEARE.read_text()
    corpus = root / "corpus"
    (corpus / "txt").mkdir(parents=True)
    for i in range(copies):
        (corpus / "txt" / f"{i:03d}.txt").write_text(text)
    paragraphs = [p for p in text.split("\n\n") if p]
    with open(corpus / "paragraphs.jsonl", "w") as f:
        for _ in range(copies):
            f.writelines(json.dumps({"text": p}) + "\n" for p in paragraphs)
    return corpus


def batches(corpus: Path, chunked: bool) -> list[list[str]]:
    """The encode_batch inputs the builder makes: documents cut into pieces, grouped by BATCH_CHARS."""
    out: list[list[str]] = [[]]
    size = 0
    for doc in read_documents(corpus):
        for piece in _chunks(doc) if chunked else [doc]:
            out[-1].append(piece)
            size += len(piece)
            if size >= BATCH_CHARS:
                out.append([])
                size = 0
    return [b for b in out if b]


def builder_inputs(corpus: Path, tokenizer: Tokenizer) -> list[list[str]]:
    """The encode_batch inputs the builder makes (give or take the few documents the val split takes)."""
    docs = ((0, doc) for doc in read_documents(corpus))
    return [[(b.joiner or "").join(p) for p in b.parts] for b in _pieces(docs, tokenizer, None, 0.0, BATCH_CHARS)]


def best_of(repeats: int, *fns: Callable[[], None]) -> list[float]:
    """Each function's best time over `repeats` rounds; rounds alternate the functions, so that load from other
    processes on a shared machine falls on both sides alike rather than on whichever ran during it."""
    times = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - t0)
    return times


def main() -> None:
    args = parse_args()
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)  # read when the Rust thread pool starts, at first use

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root, args.copies)
        mb = sum(f.stat().st_size for f in corpus.rglob("*") if f.is_file()) / 1e6
        t0 = time.perf_counter()
        tokenizer = train_tokenizer([SHAKESPEARE.read_text()[: args.train_chars]], args.vocab)
        print(
            f"corpus: {mb:.1f} MB ({args.copies} .txt files + a .jsonl of paragraphs), tokenizer vocab "
            f"{tokenizer.vocab_size} trained in {time.perf_counter() - t0:.1f}s, {args.threads} threads"
        )

        texts = batches(corpus, _chunking_is_exact(tokenizer))
        # The fastest call the library offers, as nomoat's Tokenizer.encode_batch uses it.
        encode = getattr(tokenizer.hf, "encode_batch_fast", tokenizer.hf.encode_batch)

        joined = builder_inputs(corpus, tokenizer)

        def bare() -> None:
            for batch in texts:
                encode(batch, add_special_tokens=False)

        def bare_joined() -> None:
            for batch in joined:
                encode(batch, add_special_tokens=False)

        def build() -> None:
            build_shards([corpus], tokenizer, root / "shards", progress=False)

        build()  # warm-up: page cache, tokenizer word cache, thread pool
        t_bare, t_joined, t_build = best_of(args.repeats, bare, bare_joined, build)
        ratio, own = t_bare / t_build, t_joined / t_build
        print(f"bare tokenizers encode_batch: {mb / t_bare:.1f} MB/s ({sum(map(len, texts))} inputs, one per document)")
        print(f"  on the builder's inputs:    {mb / t_joined:.1f} MB/s ({sum(map(len, joined))} inputs)")
        print(f"nomoat build_shards:          {mb / t_build:.1f} MB/s")
        print(f"ratio: {ratio:.3f}x of the bare library's speed (target >= 0.9); {own:.3f}x on the same inputs")

        if args.profile:
            prof = cProfile.Profile()
            prof.runcall(build)
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
            print(out.getvalue())

    if args.json:
        result = {
            "mb": round(mb, 2),
            "threads": args.threads,
            "bare_mb_per_s": round(mb / t_bare, 2),
            "bare_same_inputs_mb_per_s": round(mb / t_joined, 2),
            "build_mb_per_s": round(mb / t_build, 2),
            "ratio": round(ratio, 3),
            "ratio_same_inputs": round(own, 3),
            "target_met": ratio >= 0.9,
        }
        print(json.dumps(result))


if __name__ == "__main__":
    main()
