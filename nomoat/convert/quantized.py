"""Quantized checkpoints out: a model loaded with quantize="int8" or "int4" written as a nomoat checkpoint folder
(`nomoat convert quantize`) that loads back as the same int8/int4 layers, with no float weights in between.

Its config records what it holds (model.quantize). int4 is stored as plain codes, scales and offsets
(quant.quantized_state), not in the CPU kernel's packed layout, and is packed again at load. Not here: reading
such a folder (checkpoint.build_quantized, through load.load_model) or quantizing (quant.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nomoat.checkpoint import Checkpoint, write_files
from nomoat.convert.hf import copy_side_files
from nomoat.errors import UserError
from nomoat.files import atomic_folder
from nomoat.quant import quantized_state

LINEAGE_FILES = ("manifest.json", "datasheet.json")  # what `nomoat info` reads of the data a model was trained on


def save_quantized(ckpt: Checkpoint, out: str | Path) -> Path:
    """Write a model loaded with load_model(..., quantize=...) as a checkpoint folder, atomically, with the side
    files (Hugging Face config, tokenizer config, lineage) of the folder it came from."""
    bits = ckpt.cfg.model.quantize
    if bits is None:
        raise UserError(f"{ckpt.path}: the model is not quantized; load it with quantize='int8' or 'int4' first")

    def export(model: torch.nn.Module, folder: Path) -> None:
        metadata = {"format": "pt", "nomoat.quantize": bits}
        save_file(quantized_state(model), str(folder / "model.safetensors"), metadata=metadata)

    tok = ckpt.tokenizer
    with atomic_folder(out) as tmp:
        if ckpt.path.is_dir():
            copy_side_files(ckpt.path, tmp)
            for name in LINEAGE_FILES:
                if (ckpt.path / name).is_file():
                    shutil.copy(ckpt.path / name, tmp / name)
        write_files(tmp, ckpt.model, ckpt.cfg, tok, export=export)
        if not (tmp / "tokenizer_config.json").is_file():  # bos and eos live in the side file Tokenizer.load reads
            config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token}
            config["eos_token"] = tok.eos_token
            (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)
