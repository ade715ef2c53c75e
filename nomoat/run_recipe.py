"""Run recipes: the TOML file `nomoat run` reads, parsed and checked into frozen dataclasses (`load_run_recipe`).

    name = "chat-demo"
    out_dir = "runs/chat-demo"
    [corpus]            files or a data recipe; optional play tasks made from the text
    [tokenizer]         vocab_size, chat tokens
    [pretrain]          config = a preset or TOML; [pretrain.train], [pretrain.model] tables override its fields
    [sft] / [dpo]       data, base, config; [sft.train], [sft.finetune] tables
    [eval]              play tasks, bits per byte, task files
    [report]            the report card

A stage runs when its table is present. Relative paths resolve against the recipe's folder, except for
`out_dir`, which is where the user stands (as train.out_dir). Bundled recipes: `nomoat run chat-demo`. Not here:
running them (pipeline.py).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from nomoat.config import SECTIONS, check_value, from_dict, read_toml, tomllib, unknown_key
from nomoat.errors import UserError

STAGES = ("corpus", "tokenizer", "pretrain", "sft", "dpo", "eval", "report")
RECIPE_DIR = Path(__file__).parent / "presets" / "recipes"


@dataclass(frozen=True, kw_only=True)
class CorpusStage:
    files: tuple[str, ...] = ()  # .txt/.jsonl files or folders, read as `data build` reads them; "builtin:shakespeare"
    recipe: str = ""  # or a data recipe .toml (`nomoat data build RECIPE`), which names its own tokenizer
    val_fraction: float = 0.1  # files: the last part of the text held out for validation (nanoGPT's split)
    source: str = ""  # the datasheet's name, licence and address of the files (bundled text: filled in)
    license: str = ""
    url: str = ""
    play_tasks: int = 0  # > 0: chat tasks made from the text (eval/play_tasks.py): this many held-out items
    shots: int = 3  # worked examples in the base model's few-shot prompt

    def __post_init__(self) -> None:
        if bool(self.files) == bool(self.recipe):
            raise UserError("[corpus]: set either files or recipe")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"corpus.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.play_tasks < 0 or self.shots < 0:
            raise UserError("corpus.play_tasks and corpus.shots must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TokenizerStage:
    vocab_size: int = 8192
    chat_tokens: bool = True  # <|im_start|> and <|im_end|> as special tokens, ChatML as the model's template

    def __post_init__(self) -> None:
        if self.vocab_size < 259:
            raise UserError(f"tokenizer.vocab_size must be at least 259, got {self.vocab_size}")


@dataclass(frozen=True, kw_only=True)
class TrainStage:
    config: str = ""  # a preset name or TOML; pretrain defaults to "cpu", fine-tuning to TrainConfig's defaults
    base: str = ""  # sft/dpo: the model to tune; "" means the previous training stage's
    data: str = ""  # sft/dpo: records (.jsonl); "" means the corpus's play tasks
    val_data: str = ""
    tables: dict[str, dict[str, Any]] = field(default_factory=dict)  # [stage.train] etc.: RunConfig fields


@dataclass(frozen=True, kw_only=True)
class EvalStage:
    play_tasks: bool = True  # held-out play-task accuracy of each model (base few-shot, after SFT, after DPO)
    bpb: bool = True  # bits per byte of the corpus's validation text
    tasks: tuple[str, ...] = ()  # task files as train.eval_tasks takes them ("name=file.jsonl", a .toml)
    samples: int = 3  # held-out conversations shown per model in the report
    max_bytes: int = 200_000  # of validation text scored for bits per byte (0: all)


@dataclass(frozen=True, kw_only=True)
class ReportStage:
    samples: int = 3


@dataclass(frozen=True, kw_only=True)
class RunRecipe:
    name: str = "run"
    out_dir: str = "runs/run"
    corpus: CorpusStage | None = None
    tokenizer: TokenizerStage | None = None
    pretrain: TrainStage | None = None
    sft: TrainStage | None = None
    dpo: TrainStage | None = None
    eval: EvalStage | None = None
    report: ReportStage | None = None

    def to_toml(self) -> str:
        return tomli_w.dumps(recipe_dict(self))


STAGE_TYPES: dict[str, type] = {
    "corpus": CorpusStage,
    "tokenizer": TokenizerStage,
    "pretrain": TrainStage,
    "sft": TrainStage,
    "dpo": TrainStage,
    "eval": EvalStage,
    "report": ReportStage,
}


def recipe_dict(recipe: RunRecipe) -> dict[str, Any]:
    """The recipe as TOML tables: what `load_run_recipe` reads back to the same recipe."""
    out: dict[str, Any] = {"name": recipe.name, "out_dir": recipe.out_dir}
    for stage in STAGES:
        value = getattr(recipe, stage)
        if value is None:
            continue
        table = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(value).items()}
        out[stage] = {**{k: v for k, v in table.items() if k != "tables"}, **table.get("tables", {})}
    return out


def _stage(name: str, table: Any, root: Path) -> Any:
    if not isinstance(table, dict):
        raise UserError(f"recipe: [{name}] must be a table")
    cls = STAGE_TYPES[name]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    tables: dict[str, dict[str, Any]] = {}
    for key, value in table.items():
        if cls is TrainStage and key in SECTIONS and isinstance(value, dict):
            tables[key] = value  # checked against RunConfig when the stage's config is built
        elif key in hints and key != "tables":
            kwargs[key] = check_value(f"{name}.{key}", hints[key], value)
        else:
            valid = [f"{name}.{k}" for k in hints if k != "tables"]
            raise unknown_key(f"{name}.{key}", valid + ([f"{name}.{s}" for s in SECTIONS] if cls is TrainStage else []))
    for key in PATH_KEYS:
        kwargs |= _resolved(kwargs, key, root)
    if cls is TrainStage:
        _check_tables(name, tables)
        kwargs["tables"] = tables
    return cls(**kwargs)


PATH_KEYS = ("files", "recipe", "base", "data", "val_data", "config")
STAGE_SETTINGS = {"dpo": {"finetune": {"objective": "dpo"}}}  # what a stage sets over its tables: dpo trains by DPO


def merge_tables(raw: dict[str, Any], tables: dict[str, Any]) -> dict[str, Any]:
    """raw with each section of tables laid over its own (neither is changed)."""
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section, values in tables.items():
        merged.setdefault(section, {}).update(values)
    return merged


def _check_exists(field: str, value: str | tuple[str, ...] | None) -> None:
    for path in (value,) if isinstance(value, str) else value or ():
        if path and not path.startswith("builtin:") and not Path(path).exists():
            raise UserError(f"{field}: {path}: no such file or folder")


def _resolved(kwargs: dict[str, Any], key: str, root: Path) -> dict[str, Any]:
    """A path field resolved against the recipe's folder (presets and builtin: names are left alone)."""
    value = kwargs.get(key)
    if not value:
        return {}
    if isinstance(value, tuple):
        return {key: tuple(_path(v, root) for v in value)}
    if key == "config" and not value.endswith(".toml"):
        return {}
    return {key: _path(value, root)}


def _path(value: str, root: Path) -> str:
    if value.startswith("builtin:") or Path(value).expanduser().is_absolute():
        return value
    return str(root / value)


def _check_tables(name: str, tables: dict[str, dict[str, Any]]) -> None:
    for section, values in tables.items():
        hints = typing.get_type_hints(SECTIONS[section])
        for key, value in values.items():
            if key not in hints:
                raise unknown_key(f"{name}.{section}.{key}", [f"{name}.{section}.{k}" for k in hints])
            check_value(f"{name}.{section}.{key}", hints[key], value)
    try:  # each section's own checks (ranges, combinations), now rather than when the stage starts
        from_dict(merge_tables(tables, STAGE_SETTINGS.get(name, {})), where=f"[{name}]")
    except UserError as e:
        raise UserError(f"[{name}]: {e}") from None


def parse_run_recipe(raw: dict[str, Any], root: Path) -> RunRecipe:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in STAGES:
            kwargs[key] = _stage(key, value, root)
        elif key in ("name", "out_dir"):
            kwargs[key] = check_value(key, str, value)
        else:
            raise unknown_key(key, ["name", "out_dir", *STAGES])
    recipe = RunRecipe(**kwargs)
    if recipe.corpus and recipe.corpus.recipe and recipe.tokenizer:
        raise UserError("recipe: a data recipe names its own tokenizer; drop the [tokenizer] stage")
    return recipe


def check_inputs(recipe: RunRecipe) -> None:
    """Every file the recipe names exists: a missing input is named before any stage runs, not when its stage
    starts (parsing does not check, so that a bundled template with placeholder paths still loads)."""
    for name in STAGES:
        for key in PATH_KEYS:
            value = getattr(getattr(recipe, name), key, None)
            if not (key == "config" and not str(value).endswith(".toml")):  # a preset's name is no path
                _check_exists(f"{name}.{key}", value)


def resolve_run_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    if (RECIPE_DIR / f"{name_or_path}.toml").is_file():
        return RECIPE_DIR / f"{name_or_path}.toml"
    names = ", ".join(sorted(p.stem for p in RECIPE_DIR.glob("*.toml")))
    raise UserError(f"recipe {name_or_path!r}: no such file or bundled recipe (bundled: {names})")


def load_run_recipe(name_or_path: str, overrides: dict[str, str] | None = None) -> RunRecipe:
    """A recipe file or bundled recipe name, with `--stage.key value` overrides (`--pretrain.train.steps 10`)."""
    path = resolve_run_recipe(name_or_path)
    raw = read_toml(path)
    for dotted, text in (overrides or {}).items():
        _set(raw, dotted, text)
    root = Path(".") if path.parent == RECIPE_DIR else path.parent
    return parse_run_recipe(raw, root)


def _set(raw: dict[str, Any], dotted: str, text: str) -> None:
    """A command-line override: the value parsed as TOML when it can be (numbers, booleans, arrays), else text."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    *parents, key = dotted.split(".")
    table = raw
    for p in parents:
        table = table.setdefault(p, {})
        if not isinstance(table, dict):
            raise UserError(f"--{dotted}: {p} is not a table")
    table[key] = value
