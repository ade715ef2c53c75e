"""Corpus recipes: the TOML file that names sources, cleaning, dedup, decontamination and mixture weights, parsed
and checked into frozen dataclasses (`load_recipe`), and each source's files found (`source_files`).

Relative paths in a recipe are relative to the recipe file. Nothing is read here but the recipe and folder
listings. Not here: building a recipe (corpus.py), the stages it runs (stages.py), or the datasheet (datasheet.py).
"""

from __future__ import annotations

import glob
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nomoat.config import check_value, read_toml, unknown_key
from nomoat.data.clean import FilterConfig
from nomoat.data.dedup import DedupConfig
from nomoat.data.formats import input_files
from nomoat.errors import UserError

Format = Literal["txt", "jsonl", "jsonl.zst", "jsonl.gz", "parquet"]
Engine = Literal["local", "ray"]


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


def source_files(recipe: Recipe, source: Source) -> list[Path]:
    """The corpus files a source's path names: a file, a folder's corpus files, or a glob's matches, in order."""
    pattern = recipe.resolve(source.path)
    if any(c in source.path for c in "*?["):
        found = sorted(Path(p) for p in glob.glob(str(pattern), recursive=True))
        files = [f for p in found for f in (input_files(p) if p.is_dir() else [p])]
    elif not pattern.exists():
        raise UserError(f"source {source.name!r}: {pattern}: no such file or folder")
    else:
        files = input_files(pattern) if pattern.is_dir() else [pattern]
    if not files:
        raise UserError(f"source {source.name!r}: {pattern} matches no corpus files")
    return files
