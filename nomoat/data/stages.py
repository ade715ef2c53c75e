"""The stages both engines share: a source file read in batches (`read_batches`), the per-document stages
(`Preparer`: normalise, filter, dedup fingerprints, contamination, copies by weight), the order-dependent
keep-first pass (`keep`), and the `Plan` and per-source reports they count into.

`Preparer` runs in worker processes (corpus.py) or Ray actors (ray_engine.py); `keep` runs in the driving
process, so both engines write the same bytes. Not here: running the stages (corpus.py, ray_engine.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nomoat.data.clean import check, normalize, strip_gutenberg
from nomoat.data.decontaminate import Decontaminator
from nomoat.data.dedup import Deduplicator, Fingerprints, fingerprints
from nomoat.data.formats import input_sha256, read_corpus_file
from nomoat.data.recipe import Recipe, Source
from nomoat.files import BadLines
from nomoat.tokenizer import Tokenizer

BATCH_DOCS = 1024  # documents per worker call and vectorised MinHash; the result does not depend on it


def _lookup(record: dict, dotted: str) -> Any:
    """record["meta"]["pile_set_name"] for "meta.pile_set_name", or a literal dotted key; None if absent."""
    if dotted in record:
        return record[dotted]
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


@dataclass
class RawBatch:
    """Documents of one file that passed meta_filter, in order, and what reading them counted."""

    texts: list[str]
    documents: int = 0  # records read, before meta_filter
    bytes: int = 0  # UTF-8 bytes of their text
    meta_filtered: int = 0
    bad_lines: list[str] = field(default_factory=list)  # "path:line: reason" of each JSON line skipped
    progress: int = 0  # bytes of the file read since the previous batch


def read_batches(file: Path, source: Source, strict: bool, size: int = BATCH_DOCS) -> Iterator[RawBatch]:
    """A source file's documents in batches of `size`; with `strict`, a bad JSON line is a UserError."""
    batch, read = RawBatch([]), 0

    def skip(message: str) -> None:
        batch.bad_lines.append(message)

    for record, pos in read_corpus_file(file, source.format, source.text_field, None if strict else skip):
        batch.progress += pos - read
        read = pos
        text = record[source.text_field]
        batch.documents += 1
        batch.bytes += len(text.encode())
        if any(_lookup(record, k) != v for k, v in source.meta_filter):
            batch.meta_filtered += 1
        else:
            batch.texts.append(text)
        if len(batch.texts) == size:
            yield batch
            batch = RawBatch([])
    if batch.documents or batch.bad_lines:
        yield batch


@dataclass
class Prepared:
    """A batch after the stages that look at one document at a time; "per passed document" lists follow the
    order of the texts that passed the quality filter."""

    read: RawBatch  # the reading counts, without the texts
    drops: list[str]  # the quality rule each dropped document failed
    fingerprints: Fingerprints | None  # of the passed documents; None without dedup
    contaminated: list[list[str]]  # per passed document, the eval items it shares an n-gram with
    copies: list[int]  # per passed document, how often its source's weight repeats it


class Preparer:
    """normalize, strip_gutenberg, the quality filter, dedup fingerprints, contamination and copies: everything
    that needs no other document, so it runs in worker processes (or Ray actors) in any order."""

    def __init__(self, recipe: Recipe, decon: Decontaminator | None) -> None:
        self.recipe, self.decon = recipe, decon

    def __call__(self, raw: RawBatch, weight: float) -> tuple[Prepared, list[str]]:
        """The batch's summary for the keep-first pass, and the normalised texts of the documents that passed."""
        recipe, passed, drops = self.recipe, [], []
        for text in raw.texts:
            text = normalize(text)
            text = strip_gutenberg(text) if recipe.strip_gutenberg else text
            if rule := check(text, recipe.clean):
                drops.append(rule)
            else:
                passed.append(text)
        prepared = Prepared(
            read=dataclasses.replace(raw, texts=[]),
            drops=drops,
            fingerprints=fingerprints(passed, recipe.dedup) if recipe.dedup is not None and passed else None,
            contaminated=[self.decon.contaminated_by(t) if self.decon else [] for t in passed],
            copies=[_copies(t, weight, recipe.corpus.seed) for t in passed],
        )
        return prepared, passed


def keep(prepared: Prepared, report: dict, dedup: Deduplicator | None, log: BadLines) -> list[tuple[int, int]]:
    """The keep-first pass over one prepared batch, in corpus order: (index into the passed documents, copies) of
    each document kept. Counts everything read and dropped into the source's `report`."""
    read = prepared.read
    report["documents_in"] += read.documents
    report["bytes_in"] += read.bytes
    report["meta_filtered"] += read.meta_filtered
    report["bad_lines"] += len(read.bad_lines)
    for message in read.bad_lines:
        log(message)
    report["filter_drops"].update(prepared.drops)
    matches: list[int | None] = [None] * len(prepared.copies)
    if dedup is not None and prepared.fingerprints is not None:
        before = dict(dedup.stats)
        first = before["documents"]
        matches = dedup.add_fingerprints(range(first, first + len(matches)), prepared.fingerprints)
        for key in ("exact_duplicates", "near_duplicates"):
            report[key] += dedup.stats[key] - before[key]
    kept = []
    for k, (match, ids, copies) in enumerate(zip(matches, prepared.contaminated, prepared.copies, strict=True)):
        if match is not None:
            continue
        if ids:
            report["contaminated"] += 1
            report["contaminated_by"].update(ids)
            continue
        report["unique_documents_out"] += 1
        kept.append((k, copies))
    return kept


def _copies(text: str, weight: float, seed: int) -> int:
    """floor(weight) copies, plus one more for a fraction of documents picked by a hash of their content."""
    whole, frac = divmod(weight, 1.0)
    u = int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:8], "little") / 2**64
    return int(whole) + (u < frac)


def new_report(source: Source, files: list[Path], root: Path) -> dict:
    return {
        "name": source.name,
        "path": source.path,
        "license": source.license,
        "url": source.url,
        "weight": source.weight,
        "files": [{"path": os.path.relpath(f, root), "sha256": input_sha256(f)} for f in files],
        "documents_in": 0,
        "bad_lines": 0,
        "bytes_in": 0,
        "meta_filtered": 0,
        "filter_drops": Counter(),
        "exact_duplicates": 0,
        "near_duplicates": 0,
        "contaminated": 0,
        "contaminated_by": Counter(),
        "unique_documents_out": 0,
    }


@dataclass
class Plan:
    """A loaded recipe with its files, the datasheet reports both engines count into, and the shared state."""

    recipe: Recipe
    files: list[list[Path]]  # per source
    reports: list[dict]  # per source
    preparer: Preparer
    dedup: Deduplicator | None  # the keep-first state; lives in the driving process
    tokenizer: Tokenizer
    log: BadLines
    strict: bool
    read_all: bool = False  # set once every document was read, so a reading error is not taken for "none kept"
