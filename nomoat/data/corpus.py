"""Building a recipe into shards and a datasheet (`build_corpus`): sources read in order, the per-document stages
in a pool of worker processes, the keep-first pass here, then tokenized and written; or handed to the Ray
engine. A rerun whose recipe, tokenizer and input bytes are unchanged (the fingerprint) is skipped.

Not here: the recipe format (recipe.py), the stages (stages.py), the Ray engine (ray_engine.py), the datasheet's
contents (datasheet.py). Shuffling across sources is left to the loader, which samples windows at random.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from nomoat.data.datasheet import drop_summary, write_datasheet
from nomoat.data.decontaminate import Decontaminator, load_eval_files
from nomoat.data.dedup import Deduplicator
from nomoat.data.encode import Encoded, encode_documents
from nomoat.data.formats import input_sha256
from nomoat.data.loader import ShardSet
from nomoat.data.recipe import Engine, Recipe, load_recipe, source_files
from nomoat.data.shards import load_manifest, write_shards
from nomoat.data.stages import Plan, Prepared, Preparer, RawBatch, keep, new_report, read_batches
from nomoat.errors import UserError
from nomoat.files import BadLines
from nomoat.tokenizer import Tokenizer


def build_corpus(
    recipe_path: str | Path,
    out_dir: str | Path,
    progress: bool = True,
    strict: bool = False,
    force: bool = False,
    engine: Engine | None = None,
    ray_address: str | None = None,
) -> dict:
    """Build a recipe into shards, manifest.json, datasheet.json, datasheet.md and mixture.png in `out_dir`.

    Sources stream in recipe order through meta_filter, normalize (+ strip_gutenberg), the quality filter, one
    exact + near Deduplicator across all sources (so an earlier source wins a duplicate), decontamination, then
    repetition by weight. Same recipe and inputs give byte-identical files, on either engine (`engine` and
    `ray_address` override the recipe's corpus.engine and corpus.ray_address). Returns the datasheet. A JSON
    line that does not parse is skipped with a warning and counted in its source's `bad_lines`, or, with
    `strict`, stops the build. A rerun whose recipe, tokenizer and input bytes are unchanged returns the finished
    datasheet without rebuilding, unless `force`, marked `"skipped": True` (a key the file does not hold).
    """
    recipe = load_recipe(recipe_path)
    engine = engine or recipe.corpus.engine
    tokenizer = Tokenizer.load(recipe.resolve(recipe.corpus.tokenizer))
    files = [source_files(recipe, s) for s in recipe.sources]  # fails fast on a missing source
    eval_paths = [recipe.resolve(p) for p in recipe.decontaminate.eval_files] if recipe.decontaminate else []
    reports = [new_report(s, fs, recipe.root) for s, fs in zip(recipe.sources, files, strict=True)]
    fingerprint = _fingerprint(Path(recipe_path), tokenizer, reports, eval_paths)
    if not force and (done := _finished(Path(out_dir), fingerprint)) is not None:
        return done | {"skipped": True}  # a rerun over the same recipe, tokenizer and input bytes: the same files
    plan = _new_plan(recipe, files, reports, tokenizer, eval_paths, strict)
    records = [{"path": r["name"], "sha256": _combined_sha256(r["files"])} for r in reports]

    def finish(folder: Path, manifest: dict) -> None:
        write_datasheet(folder, recipe, Path(recipe_path), reports, manifest, fingerprint)

    total = sum(f.stat().st_size for fs in files for f in fs)
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
        try:
            write_shards(
                _encoded(plan, bar, engine, ray_address or recipe.corpus.ray_address or None),
                records,
                tokenizer,
                out_dir,
                val_fraction=recipe.corpus.val_fraction,
                shard_tokens=recipe.corpus.shard_tokens,
                finish=finish,
            )
        except UserError:
            if plan.read_all and sum(r["unique_documents_out"] for r in reports) == 0:
                drops = "; ".join(f"{r['name']}: {drop_summary(r)}" for r in reports)
                raise UserError(f"{recipe_path}: no document survives the recipe ({drops})") from None
            raise
        finally:
            plan.log.close()
    return json.loads((Path(out_dir) / "datasheet.json").read_text())  # as a skipped rerun returns it


def _new_plan(
    recipe: Recipe,
    files: list[list[Path]],
    reports: list[dict],
    tokenizer: Tokenizer,
    eval_paths: list[Path],
    strict: bool,
) -> Plan:
    """The shared state of a build: the eval n-grams, the keep-first dedup state, the bad-line log."""
    decon = None
    if recipe.decontaminate is not None:
        decon = Decontaminator(load_eval_files(eval_paths, recipe.decontaminate.text_field), recipe.decontaminate.n)
    dedup = Deduplicator(recipe.dedup) if recipe.dedup is not None else None
    return Plan(recipe, files, reports, Preparer(recipe, decon), dedup, tokenizer, BadLines(), strict)


def _encoded(plan: Plan, bar: tqdm, engine: Engine, ray_address: str | None) -> Iterator[Encoded]:
    """The recipe's encoded batches in corpus order, from this process's worker pool or from Ray."""
    if engine == "ray":
        from nomoat.data.ray_engine import encode_on_ray  # Ray is an optional dependency

        return encode_on_ray(plan, bar, ray_address)
    return encode_documents(_local_documents(plan, bar), plan.tokenizer, val_fraction=plan.recipe.corpus.val_fraction)


_WORKER_PREPARER: Preparer | None = None  # set in each local worker process by _init_worker


def _init_worker(preparer: Preparer) -> None:
    global _WORKER_PREPARER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (see _start_pool)
    _WORKER_PREPARER = preparer


def _start_pool(workers: int, preparer: Preparer) -> Any:
    """A spawn pool whose workers ignore SIGINT from birth: Ctrl-C reaches the terminal's whole process group,
    and the parent alone stops the build (with one line; it terminates the pool), rather than every worker
    printing a traceback. An ignored SIGINT is inherited through exec, and Python keeps it ignored at start-up."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return multiprocessing.get_context("spawn").Pool(workers, _init_worker, (preparer,))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(workers, _init_worker, (preparer,))
    finally:
        signal.signal(signal.SIGINT, previous)


def _prepare_in_worker(raw: RawBatch, weight: float) -> tuple[Prepared, list[str]]:
    assert _WORKER_PREPARER is not None
    return _WORKER_PREPARER(raw, weight)


def _local_documents(plan: Plan, bar: tqdm) -> Iterator[tuple[int, str]]:
    """(source index, text) of every document kept, with repeats, in corpus order. Reading and the keep-first
    pass run here; the per-document stages in `corpus.workers` processes, a few batches ahead."""
    workers = plan.recipe.corpus.workers or os.cpu_count() or 1
    pool = None
    if workers > 1:  # spawn: forking a process that runs tokenizer threads can deadlock
        pool = _start_pool(workers, plan.preparer)
    pending: collections.deque[tuple[int, Any]] = collections.deque()

    def emit(i: int, result: tuple[Prepared, list[str]]) -> Iterator[tuple[int, str]]:
        prepared, passed = result
        bar.update(prepared.read.progress)
        for k, copies in keep(prepared, plan.reports[i], plan.dedup, plan.log):
            yield from [(i, passed[k])] * copies

    try:
        for i, source in enumerate(plan.recipe.sources):
            for file in plan.files[i]:
                for raw in read_batches(file, source, plan.strict):
                    if pool is None:
                        yield from emit(i, plan.preparer(raw, source.weight))
                        continue
                    pending.append((i, pool.apply_async(_prepare_in_worker, (raw, source.weight))))
                    if len(pending) > 2 * workers:
                        i_done, done = pending.popleft()
                        yield from emit(i_done, done.get())
        while pending:
            i_done, done = pending.popleft()
            yield from emit(i_done, done.get())
        plan.read_all = True
    finally:
        if pool is not None:
            pool.terminate()


def _fingerprint(recipe_path: Path, tokenizer: Tokenizer, reports: list[dict], eval_paths: list[Path]) -> str:
    """Everything the output depends on, besides nomoat's own code: recipe, tokenizer and every input's bytes."""
    h = hashlib.sha256(recipe_path.read_bytes())
    h.update(tokenizer.sha256.encode())
    for report in reports:
        h.update(_combined_sha256(report["files"]).encode())
    for path in eval_paths:
        h.update(input_sha256(path).encode())
    return h.hexdigest()


def _finished(out_dir: Path, fingerprint: str) -> dict | None:
    """The datasheet of a complete earlier build with this fingerprint, or None if anything is off."""
    try:
        sheet = json.loads((out_dir / "datasheet.json").read_text())
        if sheet.get("fingerprint") != fingerprint:
            return None
        for split in ("train", "val"):
            if load_manifest(out_dir)["splits"][split]["tokens"]:
                ShardSet(out_dir, split, verify=False)  # every shard present with its recorded size
    except (OSError, ValueError, KeyError, UserError):
        return None
    return sheet


def _combined_sha256(files: list[dict]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f['path']}\0{f['sha256']}\n".encode())
    return h.hexdigest()
