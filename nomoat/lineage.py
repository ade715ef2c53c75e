"""A model's lineage: what it is, which tokenizer it reads, which text it was trained on, and what it came from.

Read from the files a checkpoint carries (config.toml, tokenizer.json, manifest.json, datasheet.json and, for
imported models, hf_config.json) without loading the weights. Not here: building the datasheet (data/datasheet.py).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from nomoat.config import ModelConfig, from_dict, read_toml
from nomoat.errors import UserError
from nomoat.load import model_folder, model_kind
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer


def lineage(path: str | Path) -> dict[str, Any]:
    """Everything a checkpoint records about its origin, as plain JSON-able values."""
    folder = model_folder(path)
    if model_kind(folder) == "gguf":
        return _gguf_lineage(folder)
    if model_kind(folder) == "hf":
        return _hf_lineage(folder)
    cfg = from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml"))
    tok = Tokenizer.load(folder / "tokenizer.json")
    out: dict[str, Any] = {
        "path": str(folder),
        "model": _model_facts(cfg.model),
        "tokenizer": {"vocab_size": tok.vocab_size, "sha256": tok.sha256},
        "base": None,
        "data": None,
    }
    if (folder / "model.safetensors").is_file():  # a LoRA checkpoint holds its adapter only: its base has these
        out["model"] |= stored_weights(folder / "model.safetensors")
    if (folder / "hf_config.json").is_file():
        hf = json.loads((folder / "hf_config.json").read_text())
        out["base"] = hf.get("_name_or_path") or hf.get("architectures", ["Hugging Face checkpoint"])[0]
    if cfg.finetune is not None:  # a fine-tuned model: its base is the model it was tuned from
        out["base"] = cfg.finetune.base
        out["finetune"] = {"method": cfg.finetune.method, "adapter": (folder / "adapter_config.json").is_file()}
    if (folder / "datasheet.json").is_file():
        sheet = json.loads((folder / "datasheet.json").read_text())
        out["data"] = [
            {
                "name": s["name"],
                "license": s.get("license"),
                "url": s.get("url"),
                "tokens": s.get("tokens_out"),
                "files": [{"path": f["path"], "sha256": f["sha256"]} for f in s.get("files", [])],
            }
            for s in sheet["sources"]
        ]
    elif (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text())
        inputs = manifest.get("inputs", []) + manifest.get("val_inputs", [])
        out["data"] = [
            {"name": Path(i["path"]).name, "license": i.get("license"), "url": i.get("url"), "tokens": i["tokens"],
             "files": [{"path": i["path"], "sha256": i["sha256"]}]}
            for i in inputs
        ]  # fmt: skip
    return out


def _model_facts(cfg: ModelConfig) -> dict[str, Any]:
    with torch.device("meta"):  # parameter counts without allocating the weights
        model = Transformer(cfg)
    return {
        "parameters": model.num_params(),
        "layers": cfg.n_layer,
        "d_model": cfg.d_model,
        "context": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
    }


ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I8": "int8", "U8": "uint8", "I32": "int32"}


def stored_values(file: Path) -> Counter[str]:
    """How many values a safetensors file stores in each dtype ("F32": n), from its header alone."""
    from safetensors import SafetensorError, safe_open

    counts: Counter[str] = Counter()
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                part = f.get_slice(key)
                counts[part.get_dtype()] += math.prod(part.get_shape())
    except SafetensorError as e:
        raise UserError(f"{file}: not a readable safetensors file ({e})") from None
    return counts


def stored_weights(file: Path) -> dict[str, Any]:
    """The weight file's size and the dtype most of its values are stored in."""
    counts = stored_values(file)
    dtype = counts.most_common(1)[0][0] if counts else None
    return {"weight_bytes": file.stat().st_size, "dtype": ST_DTYPES.get(dtype, dtype)}


def _hf_lineage(folder: Path) -> dict[str, Any]:
    """A Hugging Face folder: its own base; its size and tokenizer read as a checkpoint's are, the weights unread."""
    from nomoat.convert.hf import config_from_hf, read_hf_config

    hf = read_hf_config(folder)
    model: dict[str, Any] = {"architecture": hf.get("architectures", ["?"])[0]}
    try:
        model |= _model_facts(config_from_hf(hf))
    except UserError:  # an architecture nomoat does not load is still named
        pass
    model["weight_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    model["dtype"] = hf.get("dtype") or hf.get("torch_dtype")
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.load(folder / "tokenizer.json")
        tokenizer = {"vocab_size": tok.vocab_size, "sha256": tok.sha256}
    return {"path": str(folder), "model": model, "tokenizer": tokenizer, "base": str(folder), "data": None}


def _gguf_lineage(path: Path) -> dict[str, Any]:
    """A GGUF file's architecture, and the lineage nomoat wrote into it when nomoat exported it."""
    from nomoat.convert.gguf_read import read_metadata

    meta = read_metadata(path)
    recorded = json.loads(meta.get("nomoat.lineage") or "{}")
    out = {"path": str(path), "model": {"architecture": f"GGUF {meta.get('general.architecture', '?')}"}}
    return out | {"base": recorded.get("base") or str(path), "data": recorded.get("data")}


def format_lineage(info: dict[str, Any]) -> str:
    """The lineage as a few readable lines for the terminal."""
    lines = [f"model      {info['path']}"]
    m = info["model"]
    if "architecture" in m:
        kind = "file" if m["architecture"].startswith("GGUF ") else "folder"
        lines.append(f"           a {'' if kind == 'file' else 'Hugging Face '}{m['architecture']} {kind}")
    if "parameters" in m:
        lines.append(
            f"           {m['parameters']:,} parameters, {m['layers']} layers x {m['d_model']}, "
            f"context {m['context']}, vocabulary {m['vocab_size']:,}"
        )
    if m.get("weight_bytes"):
        dtype = m.get("dtype") or "dtype not recorded"
        lines.append(f"           {m['weight_bytes'] / 1e6:,.1f} MB of weights ({dtype})")
    if info.get("tokenizer"):
        lines.append(
            f"tokenizer  {info['tokenizer']['vocab_size']:,} tokens, sha256 {info['tokenizer']['sha256'][:16]}"
        )
    tuned = f" ({info['finetune']['method']} fine-tuning)" if info.get("finetune") else ""
    lines.append(f"base       {info['base'] or 'none: trained from scratch'}{tuned}")
    if not info.get("data"):
        lines.append("data       not recorded")
    for source in info.get("data") or []:
        licence = source["license"] or "licence not recorded"
        tokens = f"{source['tokens']:,} tokens" if source["tokens"] is not None else "tokens unknown"
        lines.append(
            f"data       {source['name']}: {tokens}, {licence}" + (f", {source['url']}" if source["url"] else "")
        )
        lines += [f"             {f['sha256'][:16]}  {f['path']}" for f in source["files"][:5]]
        if len(source["files"]) > 5:
            lines.append(f"             and {len(source['files']) - 5} more files")
    return "\n".join(lines)
