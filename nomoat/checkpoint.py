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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nomoat.config import RunConfig, from_dict, read_toml, save_config
from nomoat.errors import UserError
from nomoat.model import Transformer
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
) -> Path:
    """Write run_dir/checkpoints/step_N atomically and keep only the newest keep_last (0 keeps all)."""
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
    folder = resolve_checkpoint(path)
    cfg = from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml"))
    model = Transformer(cfg.model)
    load_weights(model, folder / "model.safetensors")
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


def load_weights(model: Transformer, file: Path) -> None:
    try:
        state = load_file(str(file))
    except FileNotFoundError:
        raise UserError(f"{file}: no such file") from None
    except SafetensorError as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise UserError(f"{file}: weights do not fit the config ({str(e).splitlines()[-1].strip()})") from None
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"{file}: weights do not fit the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
