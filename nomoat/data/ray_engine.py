"""Corpus recipes on Ray: stages.py's stages as Ray tasks and actors, on a cluster or a Ray started in-process.

Tasks read files (a streaming generator per file); actors run the per-document stages (clean, filter, MinHash
fingerprints, contamination) and tokenize; this process makes the order-dependent decisions (keep-first dedup,
counts) on fingerprints alone and writes the shards, so the output is byte-identical to the local engine's.
Texts go from reader to actor to actor through Ray's object store, never through this process.
Not here: the stages themselves (stages.py, dedup.py, encode.py), cluster setup, and ray.data, whose readers
neither count bad JSON lines nor refuse binary files as formats.read_corpus_file does.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from nomoat.data.encode import BATCH_CHARS, Encoded, batch_pieces, shard_dtype
from nomoat.data.recipe import Source
from nomoat.data.stages import BATCH_DOCS, Plan, Prepared, Preparer, RawBatch, keep, read_batches
from nomoat.errors import UserError
from nomoat.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pathlib import Path

AHEAD_FILES = 2  # files read at once (given the CPUs): a reader holds its CPU slot while it waits for this process
AHEAD_BATCHES = 2  # batches per actor in flight at each stage: enough to hide this process's turn


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray; pip install 'nomoat[ray]'") from None
    return ray


def _read(file: Path, source: Source, strict: bool) -> Iterator[RawBatch]:
    yield from read_batches(file, source, strict, BATCH_DOCS)


class _Worker:
    """One actor: the per-document stages (with the eval n-grams) and the tokenizer, received once rather than
    with every batch."""

    def __init__(self, preparer: Preparer, tokenizer: Tokenizer, val_fraction: float) -> None:
        self.preparer, self.tokenizer, self.val_fraction = preparer, tokenizer, val_fraction
        self.dtype = shard_dtype(tokenizer)

    def prepare(self, raw: RawBatch, weight: float) -> tuple[Prepared, list[str]]:
        return self.preparer(raw, weight)

    def encode(self, passed: list[str], source: int, kept: list[tuple[int, int]]) -> list[Encoded]:
        """Tokens of the kept documents, each repeated `copies` times, in order, in encode batches as the local
        engine cuts them (encode.batch_pieces)."""
        docs = ((source, passed[k]) for k, copies in kept for _ in range(copies))
        pieces = batch_pieces(docs, self.tokenizer, None, self.val_fraction, BATCH_CHARS)
        return [batch.encode(self.tokenizer, self.dtype) for batch in pieces]


def _get(ray: Any, ref: Any) -> Any:
    """ray.get, with a UserError raised in a worker (a bad line under --strict, a binary file) re-raised as is."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e
        while isinstance(cause, ray.exceptions.RayTaskError):
            cause = cause.cause
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


def _in_order(ray: Any, submitted: Iterator[tuple[Any, Any]], ahead: int) -> Iterator[tuple[Any, Any]]:
    """(tag, value) for each (tag, object ref), in submission order, with at most `ahead` refs unfinished: a
    lazy `submitted` is drawn from only as results are taken, which bounds the memory of every stage."""
    pending: collections.deque[tuple[Any, Any]] = collections.deque()
    for item in submitted:
        pending.append(item)
        if len(pending) > ahead:
            tag, ref = pending.popleft()
            yield tag, _get(ray, ref)
    while pending:
        tag, ref = pending.popleft()
        yield tag, _get(ray, ref)


def encode_on_ray(plan: Plan, bar: tqdm, address: str | None) -> Iterator[Encoded]:
    """The recipe's encoded batches in corpus order, computed on Ray; counts go into plan.reports as on the
    local engine. Joins the cluster at `address`, or starts a local Ray with corpus.workers CPUs (0: all)."""
    return _encode(_ray(), plan, bar, address)  # fails now if Ray is missing, and starts Ray at the first batch


def _check_reachable(address: str) -> None:
    """Ray retries an unreachable head for minutes; a host:port that refuses a TCP connection is named at once."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as e:
        raise UserError(f"cannot join the Ray cluster at {address}: {e.strerror or e}") from None


def _encode(ray: Any, plan: Plan, bar: tqdm, address: str | None) -> Iterator[Encoded]:
    started = not ray.is_initialized()  # a Ray session the caller started stays up for the caller
    if started:
        try:
            if address:
                _check_reachable(address)
                ray.init(address=address, logging_level=logging.WARNING)
            else:
                cpus = plan.recipe.corpus.workers or os.cpu_count() or 1
                ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
        except (ConnectionError, TimeoutError) as e:
            raise UserError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    try:
        yield from _stages(ray, plan, bar)
    finally:
        if started:
            ray.shutdown()


def _stages(ray: Any, plan: Plan, bar: tqdm) -> Iterator[Encoded]:
    recipe = plan.recipe
    n = plan.recipe.corpus.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    # Actors ask for no CPU, so that they never wait for the readers' CPU slots while the readers wait for them;
    # SPREAD places them over the nodes. One Rust thread each: the actors, not the tokenizer, use the cores.
    worker = ray.remote(_Worker).options(
        num_cpus=0, scheduling_strategy="SPREAD", runtime_env={"env_vars": {"RAYON_NUM_THREADS": "1"}}
    )
    preparer, tokenizer = ray.put(plan.preparer), ray.put(plan.tokenizer)
    actors = [worker.remote(preparer, tokenizer, recipe.corpus.val_fraction) for _ in range(n)]
    # The reader holds back once this many of its batches wait unconsumed: memory stays bounded.
    reader = ray.remote(_read).options(_generator_backpressure_num_objects=2 * AHEAD_BATCHES)

    def raw_batches() -> Iterator[tuple[int, Any]]:
        """(source index, ref of a RawBatch) in corpus order, with the next files' readers started early."""
        files = ((i, f) for i, fs in enumerate(plan.files) for f in fs)
        readers: collections.deque[tuple[int, Any]] = collections.deque()
        for i, file in itertools.islice(files, AHEAD_FILES):
            readers.append((i, reader.remote(file, recipe.sources[i], plan.strict)))
        while readers:
            i, gen = readers.popleft()
            for ref in gen:
                yield i, ref
            # Only once a reader is done: a later file's reader must never hold the CPU slot an earlier one needs.
            for i_next, file in itertools.islice(files, 1):
                readers.append((i_next, reader.remote(file, recipe.sources[i_next], plan.strict)))

    actor_cycle = itertools.cycle(actors)

    def prepared() -> Iterator[tuple[tuple[int, Any, Any], Any]]:
        for i, raw in raw_batches():
            actor = next(actor_cycle)
            summary, passed = actor.prepare.options(num_returns=2).remote(raw, recipe.sources[i].weight)
            yield (i, actor, passed), summary

    def encoded() -> Iterator[tuple[None, Any]]:
        for (i, actor, passed), summary in _in_order(ray, prepared(), AHEAD_BATCHES * n):
            bar.update(summary.read.progress)
            kept = keep(summary, plan.reports[i], plan.dedup, plan.log)
            if kept:  # the actor that prepared the texts encodes them: they are in its node's object store
                yield None, actor.encode.remote(passed, i, kept)

    for _, batches in _in_order(ray, encoded(), AHEAD_BATCHES * n):
        yield from batches
    plan.read_all = True
