"""Checkpoint folders: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a folder `step_00001000/` holding `model.safetensors`, `config.toml`, `tokenizer.json`, the data
`manifest.json`, `trainer.pt` (step, RNG and loader state: tensors and plain values only, read back with
`weights_only=True`) and `state/`: model and optimizer by parameter name in `torch.distributed.checkpoint`'s
format, where each rank writes its own shards and any world size reads them back (of a model with frozen
weights, such as a LoRA base, only what trains: `frozen_sha256` identifies the rest). It is built in a temporary
folder and renamed into place, so a save that fails midway leaves the previous checkpoint untouched. Sharded
(FSDP) runs skip `model.safetensors`; `consolidate` streams it out of `state/` one tensor at a time.
Not here: other formats and adapters, which commands load through load.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nomoat.config import ModelConfig, RunConfig, from_dict, read_toml, save_config
from nomoat.distributed import ONE_PROCESS, World, barrier
from nomoat.errors import UserError
from nomoat.files import fsync_tree, replace_folder
from nomoat.model import Transformer, rope_tables
from nomoat.quant import load_quantized_state
from nomoat.tokenizer import Tokenizer

PREFIX = "step_"

# torch.distributed.checkpoint says so on every single-process save and load; one process is the common case.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with a tied lm_head left out: safetensors stores no aliases, and loading re-ties it."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:  # type: ignore[union-attr]
        state.pop("lm_head.weight", None)
    return state


def save_weights(model: torch.nn.Module, folder: Path) -> None:
    """The default inference artefact: the whole model as one safetensors file."""
    save_file(model_state(model), str(folder / "model.safetensors"), metadata={"format": "pt"})  # type: ignore[arg-type]


def is_sharded(model: torch.nn.Module) -> bool:
    """FSDP2 turns parameters into DTensors: no rank holds the whole model."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    cfg: RunConfig,
    tokenizer: Tokenizer,
    manifest: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    keep_last: int = 0,
    extra_files: Sequence[Path] = (),
    *,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    export: Callable[[torch.nn.Module, Path], None] = save_weights,
    world: World = ONE_PROCESS,
) -> Path:
    """Write run_dir/checkpoints/step_N atomically and keep only the newest keep_last (0 keeps all).

    Every rank calls this: each writes its shards of model and optimizer into state/, rank 0 the rest. `model`
    is the plain (or FSDP-sharded) model, never a DDP wrapper. extra_files are copied in verbatim: the corpus
    datasheet, so that every checkpoint carries its lineage."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    # files.atomic_folder for many ranks: one temporary name that every rank can compute, renamed by rank 0
    tmp = root / f".tmp-{final.name}"
    if world.main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(world)
    try:
        if optimizer is not None:
            import torch.distributed.checkpoint as dcp

            dcp.save(_train_state(model, optimizer), checkpoint_id=tmp / "state", no_dist=world.size == 1)
        barrier(world)
        if world.main:
            write_files(tmp, model, cfg, tokenizer, manifest, trainer, extra_files, export)
            fsync_tree(tmp)
            replace_folder(tmp, final)  # re-saving the same step (a signal right after a periodic save) replaces it
    except BaseException:
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(world)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last and world.main else []:
        shutil.rmtree(old)
    return final


# The leading arguments are save_checkpoint's, which hands them on unchanged: a deliberate parallel.
def write_files(
    folder: Path,
    model: torch.nn.Module,
    cfg: RunConfig,
    tokenizer: Tokenizer,
    manifest: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    extra_files: Sequence[Path] = (),
    export: Callable[[torch.nn.Module, Path], None] = save_weights,
) -> None:
    """Everything of a checkpoint but state/ into folder: weights (unless sharded), config, tokenizer, and what
    was given of manifest, trainer state and side files."""
    if not is_sharded(model):
        export(model, folder)
    save_config(cfg, folder / "config.toml")
    tokenizer.save(folder / "tokenizer.json")
    if manifest is not None:
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    if trainer is not None:
        torch.save(trainer, folder / "trainer.pt")
    for extra in extra_files:
        shutil.copy(extra, folder / extra.name)


def has_frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def frozen_sha256(model: torch.nn.Module) -> str | None:
    """sha256 of what does not train (frozen parameters and buffers, by name, dtype and shape) of a model with
    frozen parameters, such as a LoRA base; None when everything trains. Its checkpoints' state/ holds only
    what trains, since the rest is rebuilt from the base, and this hash shows on resume that it was rebuilt the
    same. Taken from the plain model, before any sharding."""
    if not has_frozen(model):
        return None
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name not in trainable:
            t = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name} {t.dtype} {tuple(tensor.shape)}\n".encode())
            digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def _train_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
) -> dict[str, Any]:
    """Model and optimizer state by parameter name. For a model with frozen parameters (LoRA, QLoRA) only the
    trainable ones: the frozen base, and buffers such as its NF4 codes, come back from the base on resume."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    frozen = has_frozen(model)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=frozen))
    if frozen:
        buffers = {name for name, _ in model.named_buffers()}
        model_sd = {k: v for k, v in model_sd.items() if k not in buffers}
    return {"model": model_sd, "optim": optim_sd}


def load_train_state(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer]
) -> None:
    """Model and optimizer from state/, resharded to however this run is laid out (1 process, DDP or FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    if not (folder / "state" / ".metadata").is_file():
        raise UserError(f"{folder}: no state/ (model and optimizer), so training cannot resume from it")
    _state_metadata(folder)
    state = _train_state(model, optimizer)
    _dcp_load(folder, state, no_dist=not torch.distributed.is_initialized())
    options = StateDictOptions(strict=not has_frozen(model))  # a LoRA run's state holds what trains, no more
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


class _MetadataUnpickler(pickle.Unpickler):
    """torch.distributed.checkpoint pickles its .metadata and unpickles it unchecked; this reads it first and
    admits only the classes such metadata is made of, so a crafted checkpoint cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            module.startswith("torch.distributed.checkpoint.")
            or (module, name) in {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of checkpoint metadata")
        return super().find_class(module, name)


def _state_metadata(folder: Path) -> Any:
    path = folder / "state" / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise UserError(f"{folder}: no state/.metadata") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise UserError(f"{path}: not checkpoint metadata, or corrupt ({e})") from None


def _dcp_load(folder: Path, state: dict[str, Any], no_dist: bool) -> None:
    """torch.distributed.checkpoint.load with a corrupt shard named in one line. Callers check the metadata first
    (_state_metadata), once per checkpoint rather than once per tensor."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, checkpoint_id=folder / "state", no_dist=no_dist)
    except (dcp.api.CheckpointException, EOFError, OSError, RuntimeError, pickle.UnpicklingError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{folder / 'state'}: a shard is unreadable or corrupt ({reason[:200]})") from None


def _state_tensors(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name, shape and dtype of each model tensor in state/, from its metadata alone."""
    meta = _state_metadata(folder).state_dict_metadata
    return {
        name.removeprefix("model."): (m.size, m.properties.dtype)
        for name, m in meta.items()
        if name.startswith("model.") and hasattr(m, "size")
    }


def _read_state_tensor(folder: Path, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=dtype)
    _dcp_load(folder, {"model": {name: tensor}}, no_dist=True)
    return tensor


_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8"}


def consolidate(folder: str | Path, out: str | Path | None = None) -> Path:
    """Stream state/'s model tensors into one safetensors file, holding a single tensor in memory at a time.

    safetensors is an 8-byte header length, a JSON header of offsets, then raw little-endian bytes, so the
    header can be written from metadata before any tensor is read."""
    folder = resolve_checkpoint(folder)
    if not (folder / "state" / ".metadata").is_file():
        raise UserError(f"{folder}: no state/ folder to consolidate")
    cfg = from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml"))
    tensors = _state_tensors(folder)
    if cfg.model.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        if dtype not in _ST_DTYPES:
            raise UserError(f"{folder}: tensor {name} has dtype {dtype}, which this export does not write")
        size = shape.numel() * dtype.itemsize
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    out = Path(out) if out else folder / "model.safetensors"
    tmp = out.with_name(f".tmp-{out.name}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (shape, dtype) in tensors.items():
            f.write(_read_state_tensor(folder, name, shape, dtype).contiguous().view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose newest checkpoint is meant."""
    path = Path(path)
    if (path / "model.safetensors").is_file() or (path / "state" / ".metadata").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or run folder")
    raise UserError(f"{path}: holds no model.safetensors and no checkpoints/step_* folder")


# Reads the weights a group (one layer, or the top-level tensors) at a time, in nomoat's names: with
# meta=True as meta tensors of the stored shapes and dtypes, for a pass that only plans.
WeightGroups = Callable[[bool], Iterator[dict[str, torch.Tensor]]]


@dataclass
class Checkpoint:
    path: Path
    cfg: RunConfig
    model: Transformer
    tokenizer: Tokenizer
    trainer: dict[str, Any] | None
    weights: WeightGroups | None = None  # set when `model` is a meta skeleton (loaded with device="meta")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", trainer_state: bool = False) -> Checkpoint:
    """A nomoat checkpoint or run folder (its newest checkpoint). Commands load through load.load_model, which
    also takes the other formats and adapters. On device "meta" no weight is read: the model is a checked
    skeleton and `weights` streams the tensors, so that an export holds about one layer at a time."""
    folder = resolve_checkpoint(path)
    cfg = from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml"))
    file = folder / "model.safetensors"
    if file.is_file():
        groups: WeightGroups = lambda meta: safetensors_groups([file], meta)  # noqa: E731
    else:  # a sharded run's checkpoint: gather the shards in this one process
        groups = lambda meta: _state_groups(folder, meta)  # noqa: E731
    lazy = torch.device(device).type == "meta" and cfg.model.quantize is None
    if cfg.model.quantize is not None:  # int8/int4 as stored, on the CPU also for "meta": nothing to stream
        if torch.device(device).type not in ("cpu", "meta"):
            raise UserError(f"{folder}: holds {cfg.model.quantize} weights, run by CPU kernels: give --device cpu")
        model = build_quantized(cfg.model, {k: v for group in groups(False) for k, v in group.items()}, str(file))
    else:
        weights = {k: v for group in groups(lazy) for k, v in group.items()}
        model = build_model(cfg.model, weights, str(file)).to(device)
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.vocab_size}"
        )
    trainer = read_trainer_state(folder) if trainer_state else None
    return Checkpoint(folder, cfg, model, tokenizer, trainer, groups if lazy else None)


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """Step, RNG and loader position, read back with weights_only=True so that nothing is unpickled."""
    path = folder / "trainer.pt"
    if not path.is_file():
        raise UserError(f"{folder}: no trainer.pt, so training cannot resume from it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: holds more than tensors and plain values; refusing to unpickle it") from e


def _reason(e: Exception) -> str:
    return "truncated or corrupt" if "incomplete" in str(e).lower() or "too small" in str(e).lower() else str(e)


def _check_safetensors(file: Path) -> None:
    if not file.is_file():
        raise UserError(f"{file}: weight file missing")


_FROM_ST = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
            "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def layer_of(key: str) -> int:
    """The block a tensor name belongs to (nomoat's and Hugging Face's names alike); -1 for the others."""
    found = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.", key)
    return int(found.group(1)) if found else -1


def safetensors_groups(files: list[Path], meta: bool) -> Iterator[dict[str, torch.Tensor]]:
    """The files' tensors a layer at a time (top-level ones first, as one group), each group read under a memory
    map of its own that is closed before the next, so that reading all of them holds about one layer."""
    where: dict[int, dict[str, Path]] = {}
    for file in files:
        _check_safetensors(file)
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                    where.setdefault(layer_of(key), {})[key] = file
        except SafetensorError as e:
            raise UserError(f"{file}: not a readable safetensors file ({_reason(e)})") from None
    for layer in sorted(where):
        group: dict[str, torch.Tensor] = {}
        for file in dict.fromkeys(where[layer].values()):
            with safe_open(str(file), "pt") as f:
                for key in (k for k, f_ in where[layer].items() if f_ == file):
                    group[key] = _meta_tensor(f, key, file) if meta else f.get_tensor(key)
        yield group


def _meta_tensor(f: Any, key: str, file: Path) -> torch.Tensor:
    info = f.get_slice(key)
    if info.get_dtype() not in _FROM_ST:
        raise UserError(f"{file}: tensor {key} has type {info.get_dtype()}, which nomoat does not read")
    return torch.empty(info.get_shape(), dtype=_FROM_ST[info.get_dtype()], device="meta")


def _state_groups(folder: Path, meta: bool) -> Iterator[dict[str, torch.Tensor]]:
    """state/'s model tensors a layer at a time, as safetensors_groups reads a file."""
    layers: dict[int, dict[str, tuple[torch.Size, torch.dtype]]] = {}
    for name, info in _state_tensors(folder).items():
        layers.setdefault(layer_of(name), {})[name] = info
    for layer in sorted(layers):
        if meta:
            yield {n: torch.empty(s, dtype=d, device="meta") for n, (s, d) in layers[layer].items()}
        else:
            yield {n: _read_state_tensor(folder, n, s, d) for n, (s, d) in layers[layer].items()}


def build_quantized(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> Transformer:
    """A model of the int8/int4 weights a quantized checkpoint stores (quant.quantized_state), made from them as
    they are: the skeleton is built on the meta device, so no full-precision projection ever exists."""
    with torch.device("meta"):
        model = Transformer(cfg)
    return load_quantized_state(model, state, where)


def build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], where: str) -> Transformer:
    """A model whose parameters are the given tensors (no random init, no second copy), checked name by name."""
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        expected.pop("lm_head.weight")
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        more = len(missing) + len(extra) - 1
        raise UserError(f"{where}: {what}" + (f" (and {more} more)" if more else "") + " for this config")
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise UserError(f"{where}: tensor {name} has shape {tuple(state[name].shape)}, config wants {tuple(shape)}")
    model.load_state_dict(state, strict=False, assign=True)  # names and shapes checked above
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if cfg.pos_emb == "rope":  # non-persistent buffers stayed on the meta device
        model.rope_cos, model.rope_sin = rope_tables(cfg, cfg.max_seq_len)
    return model
