"""Run configuration: frozen, keyword-only dataclasses that round-trip to TOML.

A run is `RunConfig(model=..., data=..., train=...)`. Presets are TOML files in `nomoat/presets/`; the CLI
applies dotted overrides (`--train.lr 3e-4`) checked against the field types. Nothing here touches torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from nomoat.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The switches below express GPT-2, GPT-NeoX/Pythia and LLaMA/Mistral/Qwen2 as one model."""

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention (arXiv:2305.13245); None means n_head
    d_model: int = 768
    d_ff: int = 3072
    head_dim: int | None = None  # None means d_model // n_head
    max_seq_len: int = 1024
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = "gelu_tanh"
    pos_emb: Literal["learned", "rope"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "llama3"] = "none"  # Llama 3.1's long-context frequency scaling
    rope_factor: float = 8.0  # the llama3 fields below follow Hugging Face's rope_scaling keys
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    rotary_pct: float = 1.0  # GPT-NeoX rotates only the first part of each head
    parallel_residual: bool = False  # GPT-J/NeoX: attention and MLP read the same input
    bias: bool = True  # biases on every linear and norm (GPT-2, NeoX)
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); implied by bias
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3; per head, unlike OLMo 2)
    tie_embeddings: bool = True
    init: Literal["gpt2", "neox", "normal"] = "gpt2"
    dropout: float = 0.0  # on each block's attention and MLP output while training: small corpora seen many times
    init_std: float = 0.02
    # Weight-only int8/int4 for inference that a checkpoint holds (`nomoat convert quantize`); None: float weights
    quantize: Literal["int8", "int4"] | None = None

    def __post_init__(self) -> None:
        positive = ("vocab_size", "n_layer", "n_head", "d_model", "d_ff", "max_seq_len")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_head:
            raise UserError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
        if self.n_head % self.kv_heads:
            raise UserError(f"model.n_head ({self.n_head}) must be divisible by model.n_kv_head ({self.kv_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise UserError(f"model.rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.pos_emb == "rope" and self.rotary_dim % 2:
            raise UserError(f"model.rotary_pct gives an odd rotary dimension ({self.rotary_dim})")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def rotary_dim(self) -> int:
        return int(self.dim_head * self.rotary_pct)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    shards: str = ""  # folder written by `nomoat data build`
    tokenizer: str = ""  # tokenizer.json the shards were built with
    verify: bool = True  # check shard sha256 on load


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    out_dir: str = "runs/default"
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    optimizer: Literal["adamw", "muon"] = "adamw"  # muon: Muon on the blocks' matrices, AdamW on the rest
    lr: float = 6e-4  # AdamW's peak rate; every group's rate follows the schedule as a multiple of it
    muon_lr: float = 0.02  # Muon's peak rate for the blocks' matrices (optimizer = "muon")
    muon_momentum: float = 0.95
    embed_lr: float | None = None  # token table and untied output head; None means lr
    min_lr_ratio: float = 0.1  # final lr as a fraction of lr
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_frac: float = 0.2  # warmup-stable-decay: the last fraction of steps that decays (arXiv:2404.06395)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 250  # 0 evaluates only at the end
    eval_batches: int = 0  # 0 means the whole validation split
    eval_tasks: tuple[str, ...] = ()  # scored at each validation: "hellaswag=hs.jsonl", a task .toml (nomoat.eval)
    save_every: int = 500  # 0 saves only at the end
    keep_last: int = 2  # 0 keeps every checkpoint
    log_every: int = 10
    seed: int = 1337
    device: str = "auto"  # auto: cuda when available, else cpu
    # auto: bf16 autocast on GPU; on CPU bf16 only where a probe measured it faster for this run (cached per CPU)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    time_budget: float = 0.0  # seconds of training; > 0 times the first steps and fixes train.steps to fill it
    compile: bool = False  # torch.compile each block in place
    parallel: Literal["ddp", "fsdp"] = "ddp"  # how more than one process shares the work (torchrun)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.time_budget < 0:
            raise UserError(f"train.time_budget must be >= 0 seconds (0: train.steps decides), got {self.time_budget}")
        if self.keep_last < 0:
            raise UserError(f"train.keep_last must be >= 0 (0 keeps every checkpoint), got {self.keep_last}")
        for name in ("lr", "muon_lr", "embed_lr"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(f"train.muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if self.warmup_steps < 0 or not 0.0 <= self.decay_frac <= 1.0:
            raise UserError("train.warmup_steps must be >= 0 and train.decay_frac in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Fine-tuning a base model (nomoat/finetune.py); the model section is then the base's own."""

    base: str = ""  # a nomoat checkpoint or run folder, or a Hugging Face model folder
    data: str = ""  # .jsonl/.json records: chats {"messages": [...]}, Alpaca, or {"text": ...}; or a .txt file
    val_data: str = ""  # the same kinds of records, for validation loss on the scored tokens
    method: Literal["full", "lora", "qlora"] = "lora"  # qlora: LoRA over a frozen 4-bit NF4 base (arXiv:2305.14314)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # comma-separated layer names
    double_quant: bool = True  # qlora: store the 4-bit blocks' scales in 8 bits too
    packing: bool = False  # several samples per row, no target crossing from one into the next
    overlong: Literal["truncate", "drop"] = "truncate"  # samples longer than train.seq_len + 1 tokens
    # sft: next-token loss on the scored tokens; dpo: preference pairs {"prompt", "chosen", "rejected"} (nomoat/dpo.py)
    objective: Literal["sft", "dpo"] = "sft"
    dpo_loss: Literal["sigmoid", "ipo"] = "sigmoid"  # ipo: arXiv:2310.12036, log-probs averaged over tokens
    beta: float = 0.1  # how far the policy may move from the reference (IPO's tau)
    label_smoothing: float = 0.0  # sigmoid only: the chance a preference label is flipped (conservative DPO)
    precompute_ref: bool = False  # reference log-probs computed once up front: no reference forward per step
    # dpo: weight of a next-token loss on the chosen completions added to the preference loss (TRL's
    # loss_type ["sigmoid", "sft"] with loss_weights [1, sft_weight]; RPO, arXiv:2404.19733): keeps the chosen
    # answers' likelihood from falling while the margin grows
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.lora_rank <= 0:
            raise UserError(f"finetune.lora_rank must be positive, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"finetune.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.beta <= 0:
            raise UserError(f"finetune.beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"finetune.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.dpo_loss != "sigmoid":
            raise UserError(f"finetune.label_smoothing applies to dpo_loss 'sigmoid' only, not {self.dpo_loss!r}")
        if self.sft_weight < 0:
            raise UserError(f"finetune.sft_weight must be zero or positive, got {self.sft_weight}")
        if self.sft_weight and self.objective != "dpo":
            raise UserError("finetune.sft_weight applies to objective 'dpo' only")
        if self.objective == "dpo" and self.packing:
            raise UserError("finetune.packing does not apply to objective 'dpo': each pair is its own row")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig | None = None  # set for fine-tuning runs only

    def __post_init__(self) -> None:
        if self.train.seq_len > self.model.max_seq_len:
            raise UserError(
                f"train.seq_len ({self.train.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})"
            )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
}


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain dict for TOML: None fields are dropped, since TOML has no null and None is each one's default."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out[f.name] = to_dict(value)
        elif value is not None:
            out[f.name] = value
    return out


def to_toml(cfg: Any) -> str:
    return tomli_w.dumps(to_dict(cfg))


def check_value(key: str, hint: Any, value: Any) -> Any:
    """Return value if it has the field's type (ints pass for floats), else raise naming the key."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = ", ".join(repr(c) for c in typing.get_args(hint))
            raise UserError(f"{key}: {value!r} is not one of {choices}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return check_value(key, args[0], value)
    if origin is tuple:  # TOML arrays arrive as lists; `(str, ...)` is any length, `(float, float)` exactly two
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple):
            raise UserError(f"{key}: expected an array, got {type(value).__name__} {value!r}")
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if len(value) != len(items):
            raise UserError(f"{key}: expected an array of {len(items)} items, got {value!r}")
        return tuple(check_value(f"{key}[{i}]", h, v) for i, (h, v) in enumerate(zip(items, value, strict=True)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or not isinstance(value, hint):
        raise UserError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if hint is int and isinstance(value, bool):
        raise UserError(f"{key}: expected int, got bool {value!r}")
    return value


def _parse_text(key: str, hint: Any, text: str) -> Any:
    """Parse a command-line string into the field's type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if origin is Literal or hint is str:
        return check_value(key, hint, text)
    if origin is tuple:  # comma-separated on the command line
        return check_value(key, hint, [part.strip() for part in text.split(",") if part.strip()])
    if hint is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"{key}: expected true or false, got {text!r}")
    try:
        if hint is int:
            number = float(text)  # accepts 1e4 for steps, but not 2.5
            if not number.is_integer():
                raise ValueError
            return int(number)
        return hint(text)
    except ValueError:
        raise UserError(f"{key}: expected {hint.__name__}, got {text!r}") from None


def unknown_key(key: str, valid: list[str]) -> UserError:
    """The error for a key that is not in `valid`, suggesting the nearest one."""
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {', '.join(valid)}"
    return UserError(f"unknown config key {key!r}{hint}")


def _all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def from_dict(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Build a RunConfig from nested TOML tables, checking every key and type."""
    sections: dict[str, Any] = {}
    for name, table in raw.items():
        if name not in SECTIONS:
            raise unknown_key(name, list(SECTIONS))
        if not isinstance(table, dict):
            raise UserError(f"{where}: [{name}] must be a table")
        cls = SECTIONS[name]
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in table.items():
            if key not in hints:
                raise unknown_key(f"{name}.{key}", _all_keys())
            kwargs[key] = check_value(f"{name}.{key}", hints[key], value)
        sections[name] = cls(**kwargs)
    return RunConfig(**sections)


def resolve_preset(name_or_path: str) -> Path:
    """A path to a TOML file, or the name of a bundled preset such as `cpu` or `gpt2-124m`."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{name_or_path}.toml"
    if preset.is_file():
        return preset
    names = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
    raise UserError(f"config {name_or_path!r}: no such file or preset (presets: {', '.join(names)})")


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML ({e})") from None


def apply_overrides(raw: dict[str, Any], overrides: dict[str, str]) -> dict[str, Any]:
    """Set dotted keys (`train.lr`) from command-line strings, parsed by the field's type."""
    merged = {k: dict(v) for k, v in raw.items()}
    for dotted, text in overrides.items():
        section, _, key = dotted.partition(".")
        cls = SECTIONS.get(section)
        hints = typing.get_type_hints(cls) if cls else {}
        if key not in hints:
            raise unknown_key(dotted, _all_keys())
        merged.setdefault(section, {})[key] = _parse_text(dotted, hints[key], text)
    return merged


def load_config(name_or_path: str, overrides: dict[str, str] | None = None) -> RunConfig:
    path = resolve_preset(name_or_path)
    return from_dict(apply_overrides(read_toml(path), overrides or {}), where=str(path))


def replace(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """Copy of cfg with fields changed per section: `replace(cfg, train={"steps": 10})`."""
    return dataclasses.replace(
        cfg, **{name: dataclasses.replace(getattr(cfg, name), **vals) for name, vals in sections.items()}
    )


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(to_toml(cfg))


def set_by_user(name_or_path: str, overrides: dict[str, str], dotted: str) -> bool:
    """Whether the user chose a field: as a command-line override, or in a TOML of their own. A bundled
    preset's values are defaults for its shape, not the user's choice (model.vocab_size then follows the
    tokenizer)."""
    if dotted in overrides:
        return True
    path = resolve_preset(name_or_path)
    if path.parent == PRESET_DIR:
        return False
    section, _, key = dotted.partition(".")
    table = read_toml(path).get(section, {})
    return isinstance(table, dict) and key in table


# Fields that name files: saved absolute in a checkpoint's config.toml, so that it works from any directory.
PATH_FIELDS = {"data": ("shards", "tokenizer"), "train": ("out_dir",), "finetune": ("base", "data", "val_data")}


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _absolute_task(arg: str) -> str:
    """`NAME=DATA.jsonl` or `TASK.toml[=DATA.jsonl]` (nomoat.eval.tasks) with its file paths made absolute."""
    name, eq, data = arg.partition("=")
    name = _absolute(name) if name.endswith(".toml") else name
    return f"{name}{eq}{_absolute(data)}" if eq else name


def absolute_paths(cfg: RunConfig) -> RunConfig:
    """cfg with every path resolved against the current directory (`~` expanded): what a checkpoint saves."""
    sections: dict[str, dict[str, Any]] = {}
    for name, keys in PATH_FIELDS.items():
        section = getattr(cfg, name)
        if section is not None:
            sections[name] = {key: _absolute(getattr(section, key)) for key in keys}
    sections["train"]["eval_tasks"] = tuple(_absolute_task(t) for t in cfg.train.eval_tasks)
    return replace(cfg, **sections)
