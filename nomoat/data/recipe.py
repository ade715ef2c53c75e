"""Corpus recipes: a TOML file naming sources, cleaning, dedup, decontamination and mixture weights, built into
the same shards and manifest as build.py writes, plus a datasheet (JSON, Markdown, a mixture chart).

Work that needs one document at a time (`Preparer`) runs in worker processes, or on Ray (ray_engine.py); the
order-dependent pass (`keep`: which duplicate comes first) runs in this process, so both engines write the same
bytes. Relative paths in a recipe are relative to the recipe file. Not here: downloading sources, tokenizer
training, or shuffling across sources (the loader samples windows at random).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import typing
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from nomoat.config import check_value, read_toml, unknown_key
from nomoat.data.build import (
    BadLineLog,
    _input_files,
    _input_sha256,
    encode_documents,
    load_manifest,
    read_records,
    write_shards,
)
from nomoat.data.clean import FilterConfig, check, normalize, strip_gutenberg
from nomoat.data.decontaminate import Decontaminator, load_eval_files
from nomoat.data.dedup import DedupConfig, Deduplicator, Fingerprints, fingerprints
from nomoat.data.loader import ShardSet
from nomoat.errors import UserError
from nomoat.tokenizer import Tokenizer

Format = Literal["txt", "jsonl", "jsonl.zst", "jsonl.gz", "parquet"]
Engine = Literal["local", "ray"]
_MD_FILES = 20  # input files listed per source in datasheet.md; datasheet.json lists them all
BATCH_DOCS = 1024  # documents per worker call and vectorised MinHash; the result does not depend on it


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    tokenizer: str
    val_fraction: float = 0.0005
    seed: int = 0  # salts the hash that picks which documents a fractional weight repeats
    shard_tokens: int = 100_000_000
    workers: int = 0  # processes that normalise and filter documents; 0: one per core. Output does not depend on it.
    engine: Engine = "local"  # "ray": the same stages on Ray (ray_engine.py); the same output
    ray_address: str = ""  # a Ray cluster to join ("ray://host:10001", "auto"); "": start a local Ray

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"corpus.val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True, kw_only=True)
class DecontaminateConfig:
    eval_files: tuple[str, ...]
    n: int = 13  # GPT-3's n-gram length (arXiv:2005.14165, app. C)
    text_field: str = "text"  # the string field of .jsonl eval files

    def __post_init__(self) -> None:
        if self.n < 1:
            raise UserError(f"decontaminate.n must be >= 1, got {self.n}")


@dataclass(frozen=True, kw_only=True)
class Source:
    name: str
    path: str  # a file, a folder, or a glob pattern
    format: Format | None = None  # None: from each file's suffix
    text_field: str = "text"
    # Dotted keys into each record ("meta.pile_set_name"), each of which must equal its value for a record to be kept.
    meta_filter: tuple[tuple[str, str | int | float | bool], ...] = ()
    weight: float = 1.0  # epochs of this source in the mixture, as in the Pile (arXiv:2101.00027, table 1)
    license: str = ""
    url: str = ""

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise UserError(f"source {self.name!r}: weight must be > 0, got {self.weight}")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    corpus: CorpusConfig
    sources: tuple[Source, ...]
    clean: FilterConfig = field(default_factory=FilterConfig)
    strip_gutenberg: bool = False
    dedup: DedupConfig | None = field(default_factory=DedupConfig)  # None: dedup disabled
    decontaminate: DecontaminateConfig | None = None
    root: Path = Path(".")  # the recipe's folder, against which relative paths resolve

    def resolve(self, path: str) -> Path:
        return self.root / Path(path).expanduser()


def _table(where: str, section: str, table: Any, hints: dict[str, Any], required: tuple[str, ...] = ()) -> dict:
    """Check a TOML table's keys and value types against `hints`; a near-miss key gets a suggestion.

    `false` stands for None in an optional field (`max_dup_line_fraction = false` turns that rule off)."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: [{section}] must be a table")
    out = {}
    for key, value in table.items():
        if key not in hints:
            raise UserError(f"{where}: {unknown_key(f'{section}.{key}', [f'{section}.{k}' for k in hints])}")
        options = typing.get_args(hints[key])
        if value is False and type(None) in options and bool not in options:
            value = None  # TOML has no null: `false` switches off a rule whose None means "off"
        out[key] = check_value(f"{section}.{key}", hints[key], value)
    if missing := [k for k in required if k not in out]:
        raise UserError(f"{where}: [{section}] needs {', '.join(missing)}")
    return out


def _hints(cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(cls).items() if k not in skip and k in cls.__dataclass_fields__}


def load_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe TOML; nothing is read but the file itself."""
    path = Path(path)
    where = str(path)
    raw = read_toml(path)
    sections = ("corpus", "clean", "dedup", "decontaminate", "source")
    for key in raw:
        if key not in sections:
            raise UserError(f"{where}: {unknown_key(key, list(sections))}")
    corpus = CorpusConfig(**_table(where, "corpus", raw.get("corpus", {}), _hints(CorpusConfig), ("tokenizer",)))
    clean = _table(where, "clean", raw.get("clean", {}), _hints(FilterConfig) | {"strip_gutenberg": bool})
    strip = clean.pop("strip_gutenberg", False)
    dedup = _table(where, "dedup", raw.get("dedup", {}), _hints(DedupConfig) | {"enabled": bool})
    enabled = dedup.pop("enabled", True)
    decon = None
    if "decontaminate" in raw:
        decon = DecontaminateConfig(
            **_table(where, "decontaminate", raw["decontaminate"], _hints(DecontaminateConfig), ("eval_files",))
        )
    tables = raw.get("source", [])
    if not isinstance(tables, list) or not tables:
        raise UserError(f"{where}: no [[source]] tables; a recipe needs at least one source")
    sources = []
    for k, table in enumerate(tables, 1):
        meta_filter = table.pop("meta_filter", {}) if isinstance(table, dict) else {}
        if not isinstance(meta_filter, dict) or not all(
            isinstance(v, str | int | float | bool) for v in meta_filter.values()
        ):
            raise UserError(f"{where}: source {k}: meta_filter must be a table of dotted keys to plain values")
        kwargs = _table(where, "source", table, _hints(Source, skip=("meta_filter",)), ("name", "path"))
        sources.append(Source(**kwargs, meta_filter=tuple(meta_filter.items())))
    names = [s.name for s in sources]
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise UserError(f"{where}: two sources are named {dup!r}")
    return Recipe(
        corpus=corpus,
        sources=tuple(sources),
        clean=FilterConfig(**clean),
        strip_gutenberg=strip,
        dedup=DedupConfig(**dedup) if enabled else None,
        decontaminate=decon,
        root=path.parent,
    )


def _source_files(recipe: Recipe, source: Source) -> list[Path]:
    pattern = recipe.resolve(source.path)
    if any(c in source.path for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
        files = [f for p in found for f in (_input_files(p) if p.is_dir() else [p])]
    elif not pattern.exists():
        raise UserError(f"source {source.name!r}: {pattern}: no such file or folder")
    else:
        files = _input_files(pattern) if pattern.is_dir() else [pattern]
    if not files:
        raise UserError(f"source {source.name!r}: {pattern} matches no corpus files")
    return files


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

    for record, pos in read_records(file, source.format, source.text_field, None if strict else skip):
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


def keep(prepared: Prepared, report: dict, dedup: Deduplicator | None, log: BadLineLog) -> list[tuple[int, int]]:
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


def _new_report(source: Source, files: list[Path], root: Path) -> dict:
    return {
        "name": source.name,
        "path": source.path,
        "license": source.license,
        "url": source.url,
        "weight": source.weight,
        "files": [{"path": os.path.relpath(f, root), "sha256": _input_sha256(f)} for f in files],
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
    log: BadLineLog
    strict: bool
    read_all: bool = False  # set once every document was read, so a reading error is not taken for "none kept"


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
    datasheet without rebuilding, unless `force`.
    """
    recipe = load_recipe(recipe_path)
    engine = engine or recipe.corpus.engine
    tokenizer = Tokenizer.load(recipe.resolve(recipe.corpus.tokenizer))
    files = [_source_files(recipe, s) for s in recipe.sources]  # fails fast on a missing source
    eval_paths = [recipe.resolve(p) for p in recipe.decontaminate.eval_files] if recipe.decontaminate else []
    reports = [_new_report(s, fs, recipe.root) for s, fs in zip(recipe.sources, files, strict=True)]
    fingerprint = _fingerprint(Path(recipe_path), tokenizer, reports, eval_paths)
    if not force and (done := _finished(Path(out_dir), fingerprint)) is not None:
        return done  # a rerun over the same recipe, tokenizer and input bytes would write the same files
    decon = None
    if recipe.decontaminate is not None:
        decon = Decontaminator(load_eval_files(eval_paths, recipe.decontaminate.text_field), recipe.decontaminate.n)
    dedup = Deduplicator(recipe.dedup) if recipe.dedup is not None else None
    plan = Plan(recipe, files, reports, Preparer(recipe, decon), dedup, tokenizer, BadLineLog(), strict)
    records = [{"path": r["name"], "sha256": _combined_sha256(r["files"])} for r in reports]

    def finish(folder: Path, manifest: dict) -> None:
        sheet = _datasheet(recipe, Path(recipe_path), reports, manifest, fingerprint)
        (folder / "datasheet.json").write_text(json.dumps(sheet, indent=2, sort_keys=True) + "\n")
        (folder / "datasheet.md").write_text(_markdown(sheet))
        _plot_mixture(sheet, folder / "mixture.png")

    total = sum(f.stat().st_size for fs in files for f in fs)
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
        try:
            if engine == "ray":
                from nomoat.data.ray_engine import encode_on_ray  # Ray is an optional dependency

                batches = encode_on_ray(plan, bar, ray_address or recipe.corpus.ray_address or None)
            else:
                batches = encode_documents(
                    _local_documents(plan, bar), tokenizer, val_fraction=recipe.corpus.val_fraction
                )
            write_shards(
                batches,
                records,
                tokenizer,
                out_dir,
                val_fraction=recipe.corpus.val_fraction,
                shard_tokens=recipe.corpus.shard_tokens,
                finish=finish,
            )
        except UserError:
            if plan.read_all and sum(r["unique_documents_out"] for r in reports) == 0:
                drops = "; ".join(f"{r['name']}: {_drop_summary(r)}" for r in reports)
                raise UserError(f"{recipe_path}: no document survives the recipe ({drops})") from None
            raise
        finally:
            plan.log.close()
    return json.loads((Path(out_dir) / "datasheet.json").read_text())  # as a skipped rerun returns it


_WORKER_PREPARER: Preparer | None = None  # set in each local worker process by _init_worker


def _init_worker(preparer: Preparer) -> None:
    global _WORKER_PREPARER
    _WORKER_PREPARER = preparer


def _prepare_in_worker(raw: RawBatch, weight: float) -> tuple[Prepared, list[str]]:
    assert _WORKER_PREPARER is not None
    return _WORKER_PREPARER(raw, weight)


def _local_documents(plan: Plan, bar: tqdm) -> Iterator[tuple[int, str]]:
    """(source index, text) of every document kept, with repeats, in corpus order. Reading and the keep-first
    pass run here; the per-document stages in `corpus.workers` processes, a few batches ahead."""
    workers = plan.recipe.corpus.workers or os.cpu_count() or 1
    pool = None
    if workers > 1:  # spawn: forking a process that runs tokenizer threads can deadlock
        pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (plan.preparer,))
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
        h.update(_input_sha256(path).encode())
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


def _drop_summary(report: dict) -> str:
    drops = Counter(report["filter_drops"])
    for key in ("meta_filtered", "exact_duplicates", "near_duplicates", "contaminated"):
        drops[key] = report[key]
    shown = ", ".join(f"{k} {v}" for k, v in sorted(drops.items()) if v)
    return f"{report['documents_in']} documents in, dropped: {shown or 'none'}"


def _datasheet(recipe: Recipe, recipe_path: Path, reports: list[dict], manifest: dict, fingerprint: str) -> dict:
    total_tokens = sum(s["tokens"] for s in manifest["inputs"]) or 1
    sources = []
    for report, out in zip(reports, manifest["inputs"], strict=True):
        sources.append(
            {
                **report,
                "filter_drops": dict(sorted(report["filter_drops"].items())),
                "contaminated_by": dict(sorted(report["contaminated_by"].items())),
                "documents_out": out["documents"],
                "bytes_out": out["bytes"],
                "tokens_out": out["tokens"],
                "token_share": round(out["tokens"] / total_tokens, 6),
            }
        )
    return {
        "recipe_sha256": hashlib.sha256(recipe_path.read_bytes()).hexdigest(),
        "fingerprint": fingerprint,
        "tokenizer_sha256": manifest["tokenizer_sha256"],
        "clean": dataclasses.asdict(recipe.clean) | {"strip_gutenberg": recipe.strip_gutenberg},
        "dedup": None if recipe.dedup is None else dataclasses.asdict(recipe.dedup),
        "decontaminate": None if recipe.decontaminate is None else dataclasses.asdict(recipe.decontaminate),
        "sources": sources,
        "splits": {name: {k: s[k] for k in ("documents", "tokens", "bytes")} for name, s in manifest["splits"].items()},
    }


def _markdown(sheet: dict) -> str:
    lines = [
        "# Datasheet",
        "",
        f"Recipe sha256 `{sheet['recipe_sha256']}`, tokenizer sha256 `{sheet['tokenizer_sha256']}`.",
        "",
        "| source | weight | docs in | docs out | bytes in | bytes out | tokens out | share | license |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in sheet["sources"]:
        lines.append(
            f"| {s['name']} | {s['weight']:g} | {s['documents_in']:,} | {s['documents_out']:,} | {s['bytes_in']:,} "
            f"| {s['bytes_out']:,} | {s['tokens_out']:,} | {s['token_share']:.1%} | {s['license'] or '?'} |"
        )
    for s in sheet["sources"]:
        lines += ["", f"## {s['name']}", "", f"- path: `{s['path']}`" + (f", from {s['url']}" if s["url"] else "")]
        lines.append(f"- dropped: {_drop_summary(s).partition('dropped: ')[2]}")
        if s["bad_lines"]:
            lines.append(f"- JSON lines that did not parse, skipped: {s['bad_lines']:,}")
        if s["contaminated_by"]:
            lines.append(f"- eval items matched: {', '.join(f'{k} ({v})' for k, v in s['contaminated_by'].items())}")
        lines.append(f"- {len(s['files'])} input files (sha256):")
        lines += [f"  - `{f['sha256']}` {f['path']}" for f in s["files"][:_MD_FILES]]
        if len(s["files"]) > _MD_FILES:
            lines.append(f"  - and {len(s['files']) - _MD_FILES:,} more, listed in datasheet.json")
    return "\n".join(lines) + "\n"


def _plot_mixture(sheet: dict, path: Path) -> None:
    # A bare Figure draws with Agg and leaves pyplot's global backend and figure list alone.
    from matplotlib.figure import Figure

    names = [s["name"] for s in sheet["sources"]]
    fig = Figure(figsize=(6, 1.2 + 0.4 * len(names)))
    ax = fig.subplots()
    ax.barh(names[::-1], [100 * s["token_share"] for s in sheet["sources"]][::-1])
    ax.set_xlabel("share of tokens (%)")
    ax.set_title("corpus mixture")
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})  # no version string in the file
