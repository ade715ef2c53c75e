"""Checkpoint folders: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a folder `step_00001000/` holding `model.safetensors`, `config.toml`, `tokenizer.json`, the data
`manifest.json` and `trainer.pt` (optimizer, step, RNG and loader state: tensors and plain values only, read
back with `weights_only=True`). It is built in a temporary folder and renamed into place, so a save that fails
midway leaves the previous checkpoint untouched. The same folder is what `nomoat generate` loads.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nomoat.config import ModelConfig, RunConfig, from_dict, read_toml, save_config
from nomoat.errors import UserError
from nomoat.model import Transformer, rope_tables
from nomoat.tokenizer import Tokenizer

PREFIX = "step_"


def model_state(model: Transformer) -> dict[str, torch.Tensor]:
    """State dict with a tied lm_head left out: safetensors stores no aliases, and loading re-ties it."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: Transformer,
    cfg: RunConfig,
    tokenizer: Tokenizer,
    manifest: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    keep_last: int = 0,
    extra_files: Sequence[Path] = (),
) -> Path:
    """Write run_dir/checkpoints/step_N atomically and keep only the newest keep_last (0 keeps all).

    extra_files are copied in verbatim: the corpus datasheet, so that every checkpoint carries its lineage."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_config(cfg, tmp / "config.toml")
        tokenizer.save(tmp / "tokenizer.json")
        if manifest is not None:
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if trainer is not None:
            torch.save(trainer, tmp / "trainer.pt")
        for extra in extra_files:
            shutil.copy(extra, tmp / extra.name)
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last else []:
        shutil.rmtree(old)
    return final


def _fsync_dir(folder: Path) -> None:
    """Flush every file so that the rename never publishes a half-written checkpoint after a power loss."""
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder whose newest checkpoint is meant."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if not path.exists():
        raise UserError(f"{path}: no such checkpoint or run folder")
    raise UserError(f"{path}: holds no model.safetensors and no checkpoints/step_* folder")


@dataclass
class Checkpoint:
    path: Path
    cfg: RunConfig
    model: Transformer
    tokenizer: Tokenizer
    trainer: dict[str, Any] | None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", trainer_state: bool = False) -> Checkpoint:
    """A nomoat checkpoint or run folder, or a Hugging Face model folder (config.json), detected by its files."""
    if (Path(path) / "config.json").is_file() and not (Path(path) / "config.toml").is_file():
        from nomoat.convert import load_hf  # only HF folders need the key maps

        return load_hf(path, device=device)
    folder = resolve_checkpoint(path)
    cfg = from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml"))
    model = build_model(cfg.model, read_safetensors([folder / "model.safetensors"]), str(folder / "model.safetensors"))
    model.to(device)
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.model.vocab_size}"
        )
    trainer = None
    if trainer_state:
        trainer_file = folder / "trainer.pt"
        if not trainer_file.is_file():
            raise UserError(f"{folder}: no trainer.pt, so training cannot resume from it")
        try:
            trainer = torch.load(trainer_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(f"{trainer_file}: holds more than tensors and plain values; refusing to unpickle it") from e
    return Checkpoint(folder, cfg, model, tokenizer, trainer)


def read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of the files, memory-mapped, so that building a model holds one copy of the weights."""
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise UserError(f"{file}: weight file missing")
        try:
            state.update(load_file(str(file)))
        except SafetensorError as e:
            reason = "truncated or corrupt" if "incomplete" in str(e).lower() or "too small" in str(e).lower() else e
            raise UserError(f"{file}: not a readable safetensors file ({reason})") from None
    return state


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
