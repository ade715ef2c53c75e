"""The one model loader: whatever a user holds, as a Checkpoint (path, config, model, tokenizer) ready to run.

`load_model` recognises, by its files, a nomoat checkpoint or run folder, a Hugging Face folder, a GGUF file
and a LoRA fine-tuning checkpoint (whose base its config names), and applies an adapter given separately (ours
or one PEFT made), merged into the weights. Every command that takes a MODEL comes here, so a format or option added
here reaches them all. Not here: writing any format (checkpoint.py, convert/) or training (finetune.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from nomoat.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from nomoat.config import FinetuneConfig, RunConfig, from_dict, read_toml
from nomoat.convert.hf import load_hf
from nomoat.errors import UserError
from nomoat.lora import ADAPTER_CONFIG, load_adapter, merge_lora
from nomoat.quant import WEIGHT_BITS, dequantize_model, quantize_model, quantize_streamed, quantize_weights
from nomoat.tokenizer import Tokenizer

Kind = Literal["hf", "gguf", "adapter", "nomoat"]


def model_kind(path: str | Path) -> Kind:
    """What a MODEL path holds, from its files alone: a GGUF file, a Hugging Face folder (config.json, no
    config.toml), an adapter folder (adapter_config.json), or a nomoat checkpoint or run folder."""
    path = Path(path)
    if path.suffix == ".gguf" and not path.is_dir():
        return "gguf"
    if (path / "config.json").is_file() and not (path / "config.toml").is_file():
        return "hf"
    if (path / ADAPTER_CONFIG).is_file():
        return "adapter"
    return "nomoat"


def model_folder(path: str | Path) -> Path:
    """The folder a MODEL path stands for: itself, or a run folder's newest checkpoint."""
    if model_kind(path) == "gguf" and not Path(path).is_file():
        raise UserError(f"{path}: no such GGUF file")
    return Path(path) if model_kind(path) != "nomoat" else resolve_checkpoint(path)


def tuned_config(folder: Path) -> RunConfig | None:
    """The run config of a fine-tuning checkpoint; None for a bare adapter folder or a pretrained model."""
    if not (folder / "config.toml").is_file():
        return None
    cfg = from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml"))
    return cfg if cfg.finetune is not None else None


def _load_base(path: str | Path, device: str | torch.device, trainer_state: bool) -> Checkpoint:
    if model_kind(path) == "hf":
        return load_hf(path, device=device)
    if model_kind(path) == "gguf":
        from nomoat.convert.gguf_read import load_gguf  # the gguf package loads only for GGUF files

        return load_gguf(path, device=_real(device))  # dequantized as it is read: there is nothing to stream
    return load_checkpoint(path, device=device, trainer_state=trainer_state)


def load_model(
    path: str | Path,
    *,
    adapter: str | Path | None = None,
    device: str | torch.device = "cpu",
    trainer_state: bool = False,
    quantize: str | None = None,
) -> Checkpoint:
    """Any MODEL a user holds, plus an optional LoRA adapter folder, merged for inference.

    A LoRA fine-tuning checkpoint loads its recorded base and applies itself; an adapter trained over a 4-bit
    base is applied to that base quantized the same way, as it was trained, and then dequantized. On device
    "meta" a checkpoint or Hugging Face folder reads no weights (the model is a skeleton, `weights` streams
    them, for exports); a GGUF file or anything with an adapter loads on the CPU instead. quantize ("int8",
    "int4") makes the weights int8/int4 for inference (quant.quantize_weights), after any adapter is merged; a
    quantized checkpoint (`nomoat convert quantize`) loads as the int8/int4 it holds, and refuses another."""
    if quantize is not None:
        if quantize not in WEIGHT_BITS:
            raise UserError(f"--quantize {quantize!r}: choose from {', '.join(WEIGHT_BITS)}")
        if torch.device(device).type != "cpu":
            raise UserError(f"--quantize {quantize} uses PyTorch's CPU kernels: give --device cpu")
        return _load_quantized(path, adapter, quantize, trainer_state)
    folder = model_folder(path)
    tokenizer = None
    if adapter is None and model_kind(folder) == "adapter":
        tuned = tuned_config(folder)
        if tuned is None:
            raise UserError(f"{folder}: an adapter folder; give the base model, with --adapter {folder}")
        adapter, fc = folder, tuned.finetune
        ckpt = _load_base(fc.base, _real(device), trainer_state=False)  # type: ignore[union-attr]
        if (folder / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(folder / "tokenizer.json")
    else:
        ckpt = _load_base(folder, device if adapter is None else _real(device), trainer_state)
        fc = None
        if adapter is not None:
            tuned = tuned_config(Path(adapter))
            fc = tuned.finetune if tuned else None
    if adapter is None:
        return ckpt
    if ckpt.cfg.model.quantize is not None:
        raise UserError(f"{ckpt.path}: holds {ckpt.cfg.model.quantize} weights; apply the adapter to the float model")
    model = apply_adapter(ckpt.model, adapter, fc)
    merge_lora(model)
    dequantize_model(model)
    return dataclasses.replace(ckpt, model=model.eval(), tokenizer=tokenizer or ckpt.tokenizer)


def _load_quantized(path: str | Path, adapter: str | Path | None, bits: str, trainer_state: bool) -> Checkpoint:
    """The model with int8/int4 weights, never whole in fp32 where it can be helped: a quantized checkpoint as
    it is stored; a checkpoint or Hugging Face folder a layer at a time as its weights stream in; a GGUF file a
    tensor at a time, its Q4_0 blocks taken as they are. Only a model with an adapter is merged whole first."""
    kind = model_kind(path)
    if adapter is None and kind == "gguf":
        from nomoat.convert.gguf_read import load_gguf  # the gguf package loads only for GGUF files

        ckpt = load_gguf(path, quantize=bits)
    else:
        stream = adapter is None and kind in ("nomoat", "hf")
        ckpt = load_model(path, adapter=adapter, device="meta" if stream else "cpu", trainer_state=trainer_state)
        held = ckpt.cfg.model.quantize
        if held is not None:
            if held != bits:
                raise UserError(f"{ckpt.path}: holds {held} weights, not {bits}; give --quantize {held} or none")
            return ckpt
        if ckpt.weights is not None:
            model = quantize_streamed(ckpt.model, ckpt.weights(False), bits, where=str(ckpt.path))
        else:
            model = quantize_weights(ckpt.model.float().eval(), bits)
        ckpt = dataclasses.replace(ckpt, model=model, weights=None)
    cfg = dataclasses.replace(ckpt.cfg, model=dataclasses.replace(ckpt.cfg.model, quantize=bits))
    return dataclasses.replace(ckpt, cfg=cfg)


def _real(device: str | torch.device) -> str | torch.device:
    return "cpu" if torch.device(device).type == "meta" else device


def apply_adapter(model: torch.nn.Module, adapter: str | Path, fc: FinetuneConfig | None) -> torch.nn.Module:
    """The model, in fp32, with the adapter's LoRA layers loaded (not merged), over the base as it was trained:
    quantized to NF4 first when the adapter was trained by QLoRA."""
    model = model.float()
    if fc is not None and fc.method == "qlora":
        quantize_model(model, fc.double_quant)
    load_adapter(model, adapter)
    return model
