"""LoRA (arXiv:2106.09685) as module surgery on the plain model, and adapters in PEFT's file format.

`add_lora` replaces chosen linear layers (nn.Linear, or the frozen NF4Linear of quant.py) in place with a
`LoRALinear` that wraps them; `merge_lora` folds each update into its weight and puts a plain nn.Linear back, so
the model is the plain Transformer again. `save_adapter`/`load_adapter` read and write PEFT's
`adapter_config.json` + `adapter_model.safetensors` under Hugging Face LLaMA names. Not here: training (train.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nomoat.errors import UserError
from nomoat.files import read_json
from nomoat.quant import NF4Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class LoRALinear(nn.Module):
    """base(x) + (alpha / r) * B(A(dropout(x))), with A (r, in) drawn as PEFT does and B (out, r) zero, so that
    a fresh adapter changes nothing."""

    def __init__(self, base: nn.Linear | NF4Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device if isinstance(base, nn.Linear) else base.codes.device
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default (nn.Linear's own init)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # off: the base layer alone (adapters_disabled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., r)
        # The scaling goes on B (out x r) rather than on the (..., out) product, and addmm adds the update into
        # y inside the matmul: two fewer passes over the layer's output than `y + B(A(x)) * scaling`.
        scaled_b = (self.lora_B * self.scaling).to(y.dtype)
        return torch.addmm(y.flatten(0, -2), h.flatten(0, -2), scaled_b.t()).view_as(y)

    def delta(self) -> torch.Tensor:
        """The weight update (out, in) in fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with the update folded in, computed in fp32 (an NF4 base is dequantized first)."""
        base = self.base
        weight = base.dequantize(torch.float32) if isinstance(base, NF4Linear) else base.weight.detach().float()
        dtype = base.dtype if isinstance(base, NF4Linear) else base.weight.dtype
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=weight.device)
        out.weight = nn.Parameter((weight + self.delta()).to(dtype), requires_grad=False)
        if base.bias is not None:
            out.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def add_lora(
    model: nn.Module, rank: int, alpha: float, dropout: float = 0.0, targets: tuple[str, ...] = TARGETS[:7]
) -> list[str]:
    """Freeze the model and wrap every linear layer whose last name is in `targets`; returns their names.

    Only the LoRA matrices are left trainable."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise UserError(f"LoRA target {unknown[0]!r} is not a linear layer name (known: {', '.join(TARGETS)})")
    if rank <= 0:
        raise UserError(f"LoRA rank must be positive, got {rank}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear | NF4Linear) and name.rpartition(".")[2] in targets
    ]
    if not names:
        raise UserError(f"no linear layer of this model is named {', '.join(targets)}")
    if "lm_head" in names and getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        raise UserError("LoRA on lm_head needs untied embeddings: merging would untie them")
    for name in names:
        _swap(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight and put plain nn.Linear layers back: the model is plain again."""
    for name, layer in lora_layers(model).items():
        _swap(model, name, layer.merged())


def unwrap_lora(model: nn.Module) -> None:
    """Drop every adapter, putting the untouched base layers back: the reverse of add_lora."""
    for name, layer in lora_layers(model).items():
        _swap(model, name, layer.base)


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model computing as its base inside the block: DPO's reference without a second copy of the weights
    (PEFT's `disable_adapter`)."""
    layers = list(lora_layers(model).values())
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def _peft_name(name: str) -> str:
    """Our module name -> the Hugging Face LLaMA one that PEFT prefixes (LlamaForCausalLM.model.layers...)."""
    return f"{_PEFT_PREFIX}{name}" if name == "lm_head" else f"{_PEFT_PREFIX}model.{name}"


def _our_name(peft_key: str) -> str:
    name = peft_key.removeprefix(_PEFT_PREFIX)
    return name if name.startswith("lm_head") else name.removeprefix("model.")


def adapter_config(model: nn.Module, base: str) -> dict[str, Any]:
    layers = lora_layers(model)
    first = next(iter(layers.values()))
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": first.rank,
        "lora_alpha": first.alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({n.rpartition(".")[2] for n in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }


def save_adapter(model: nn.Module, folder: str | Path, base: str = "") -> None:
    """Write adapter_config.json and adapter_model.safetensors as PEFT's save_pretrained does."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_peft_name(name)}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
        tensors[f"{_peft_name(name)}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(model, base), indent=2) + "\n")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    config = read_json(path, missing="no such file (not a LoRA adapter folder)")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for key in ("use_dora", "use_rslora"):
        if config.get(key):
            raise UserError(f"{path}: {key} adapters are not supported")
    return config


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Wrap the model's layers per a PEFT LoRA adapter folder and load its weights (also PEFT-made ones)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    targets = config["target_modules"]
    targets = tuple(targets) if isinstance(targets, list) else (targets,)
    add_lora(model, int(config["r"]), float(config["lora_alpha"]), 0.0, targets)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (FileNotFoundError, SafetensorError) as e:
        raise UserError(f"{folder / ADAPTER_WEIGHTS}: not a readable safetensors file ({e})") from None
    layers = lora_layers(model)
    seen = set()
    for key, tensor in tensors.items():
        module, _, kind = key.removesuffix(".weight").rpartition(".")
        name = _our_name(module)
        if name not in layers or kind not in ("lora_A", "lora_B"):
            raise UserError(f"{folder / ADAPTER_WEIGHTS}: tensor {key} matches no layer of this model")
        param = getattr(layers[name], kind)
        if param.shape != tensor.shape:
            raise UserError(f"{folder}: {key} has shape {tuple(tensor.shape)}, the model wants {tuple(param.shape)}")
        param.data.copy_(tensor)
        seen.add(name)
    if missing := sorted(set(layers) - seen):
        raise UserError(f"{folder / ADAPTER_WEIGHTS}: no weights for {missing[0]} ({len(missing)} layers missing)")
