"""Corpus recipes: a TOML file naming sources, cleaning, dedup, decontamination and mixture weights, built into
the same shards and manifest as build.py writes, plus a datasheet (JSON, Markdown, a mixture chart).

Relative paths in a recipe are relative to the recipe file. Not here: downloading sources, tokenizer training,
or shuffling across sources (the loader samples windows at random).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import multiprocessing
import os
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from nomoat.config import _check_value, _unknown, read_toml
from nomoat.data.build import BadLineLog, _input_files, _input_sha256, load_manifest, read_records, write_shards
from nomoat.data.clean import FilterConfig, check, normalize, strip_gutenberg
from nomoat.data.decontaminate import Decontaminator, load_eval_files
from nomoat.data.dedup import DedupConfig, Deduplicator
from nomoat.data.loader import ShardSet
from nomoat.errors import UserError
from nomoat.tokenizer import Tokenizer

Format = Literal["txt", "jsonl", "jsonl.zst", "jsonl.gz", "parquet"]
_MD_FILES = 20  # input files listed per source in datasheet.md; datasheet.json lists them all
_DEDUP_BATCH = 1024  # documents hashed per vectorised MinHash call; the result does not depend on it


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    tokenizer: str
    val_fraction: float = 0.0005
    seed: int = 0  # salts the hash that picks which documents a fractional weight repeats
    shard_tokens: int = 100_000_000
    workers: int = 0  # processes that normalise and filter documents; 0: one per core. Output does not depend on it.

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
            raise UserError(f"{where}: {_unknown(f'{section}.{key}', [f'{section}.{k}' for k in hints])}")
        options = typing.get_args(hints[key])
        if value is False and type(None) in options and bool not in options:
            value = None  # TOML has no null: `false` switches off a rule whose None means "off"
        out[key] = _check_value(f"{section}.{key}", hints[key], value)
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
            raise UserError(f"{where}: {_unknown(key, list(sections))}")
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


def build_corpus(
    recipe_path: str | Path, out_dir: str | Path, progress: bool = True, strict: bool = False, force: bool = False
) -> dict:
    """Build a recipe into shards, manifest.json, datasheet.json, datasheet.md and mixture.png in `out_dir`.

    Sources stream in recipe order through meta_filter, normalize (+ strip_gutenberg), the quality filter, one
    exact + near Deduplicator across all sources (so an earlier source wins a duplicate), decontamination, then
    repetition by weight. Same recipe and inputs give byte-identical files. Returns the datasheet. A JSON line
    that does not parse is skipped with a warning and counted in its source's `bad_lines`, or, with `strict`,
    stops the build. A rerun whose recipe, tokenizer and input bytes are unchanged returns the finished
    datasheet without rebuilding, unless `force`.
    """
    recipe = load_recipe(recipe_path)
    tokenizer = Tokenizer.load(recipe.resolve(recipe.corpus.tokenizer))
    files = [_source_files(recipe, s) for s in recipe.sources]  # fails fast on a missing source
    decon = None
    if recipe.decontaminate is not None:
        paths = [recipe.resolve(p) for p in recipe.decontaminate.eval_files]
        items = load_eval_files(paths, recipe.decontaminate.text_field)
        decon = Decontaminator(items, recipe.decontaminate.n)
    dedup = Deduplicator(recipe.dedup) if recipe.dedup is not None else None
    reports = [_new_report(s, fs, recipe.root) for s, fs in zip(recipe.sources, files, strict=True)]
    eval_paths = [recipe.resolve(p) for p in recipe.decontaminate.eval_files] if recipe.decontaminate else []
    fingerprint = _fingerprint(Path(recipe_path), tokenizer, reports, eval_paths)
    if not force and (done := _finished(Path(out_dir), fingerprint)) is not None:
        return done  # a rerun over the same recipe, tokenizer and input bytes would write the same files

    def survivors(i: int, batch: list[str]) -> list[str]:
        """Dedup then decontaminate one batch of cleaned documents of source i."""
        report = reports[i]
        if dedup is not None:
            before = dict(dedup.stats)
            first = before["documents"]
            matches = dedup.add_batch(range(first, first + len(batch)), batch)
            kept = [t for t, m in zip(batch, matches, strict=True) if m is None]
            for key in ("exact_duplicates", "near_duplicates"):
                report[key] += dedup.stats[key] - before[key]
            batch = kept
        if decon is not None:
            clean = []
            for text in batch:
                if ids := decon.contaminated_by(text):
                    report["contaminated"] += 1
                    report["contaminated_by"].update(ids)
                else:
                    clean.append(text)
            batch = clean
        report["unique_documents_out"] += len(batch)
        return batch

    log = BadLineLog()
    read_all = False  # so a reading error is not mistaken for an empty result below

    def documents(bar: tqdm) -> Iterator[tuple[int, str]]:
        nonlocal read_all
        for i, source in enumerate(recipe.sources):
            report, batch = reports[i], []

            def skip(message: str, report: dict = report) -> None:
                report["bad_lines"] += 1
                log(message)

            def cleaned(raw: list[str], report: dict = report) -> list[str]:
                """Normalise and filter in the worker processes; results come back in input order."""
                out = []
                for text, rule in pool_map(clean_one, raw):
                    if rule:
                        report["filter_drops"][rule] += 1
                    else:
                        out.append(text)
                return out

            for file in files[i]:
                read = 0
                for record, pos in read_records(file, source.format, source.text_field, None if strict else skip):
                    bar.update(pos - read)
                    read = pos
                    text = record[source.text_field]
                    report["documents_in"] += 1
                    report["bytes_in"] += len(text.encode())
                    if any(_lookup(record, k) != v for k, v in source.meta_filter):
                        report["meta_filtered"] += 1
                        continue
                    batch.append(text)
                    if len(batch) == _DEDUP_BATCH:
                        for kept in survivors(i, cleaned(batch)):
                            yield from [(i, kept)] * _copies(kept, source.weight, recipe.corpus.seed)
                        batch = []
            for kept in survivors(i, cleaned(batch)) if batch else []:
                yield from [(i, kept)] * _copies(kept, source.weight, recipe.corpus.seed)
        read_all = True

    records = [{"path": r["name"], "sha256": _combined_sha256(r["files"])} for r in reports]

    def finish(folder: Path, manifest: dict) -> None:
        sheet = _datasheet(recipe, Path(recipe_path), reports, manifest, fingerprint)
        (folder / "datasheet.json").write_text(json.dumps(sheet, indent=2, sort_keys=True) + "\n")
        (folder / "datasheet.md").write_text(_markdown(sheet))
        _plot_mixture(sheet, folder / "mixture.png")

    total = sum(f.stat().st_size for fs in files for f in fs)
    clean_one = functools.partial(_clean_document, cfg=recipe.clean, gutenberg=recipe.strip_gutenberg)
    workers = recipe.corpus.workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None

    def pool_map(fn: Callable[[str], tuple[str, str | None]], texts: list[str]) -> list[tuple[str, str | None]]:
        if pool is None:
            return list(map(fn, texts))
        return pool.map(fn, texts, chunksize=max(1, len(texts) // (4 * workers)))

    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress) as bar:
        try:
            write_shards(
                documents(bar),
                records,
                tokenizer,
                out_dir,
                val_fraction=recipe.corpus.val_fraction,
                shard_tokens=recipe.corpus.shard_tokens,
                finish=finish,
            )
        except UserError:
            if read_all and sum(r["unique_documents_out"] for r in reports) == 0:
                drops = "; ".join(f"{r['name']}: {_drop_summary(r)}" for r in reports)
                raise UserError(f"{recipe_path}: no document survives the recipe ({drops})") from None
            raise
        finally:
            log.close()
            if pool is not None:
                pool.terminate()
    return json.loads((Path(out_dir) / "datasheet.json").read_text())  # as a skipped rerun returns it


def _clean_document(text: str, cfg: FilterConfig, gutenberg: bool) -> tuple[str, str | None]:
    """Normalised text and the first quality rule it fails (None: keep); runs in a worker process."""
    text = normalize(text)
    text = strip_gutenberg(text) if gutenberg else text
    return text, check(text, cfg)


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
