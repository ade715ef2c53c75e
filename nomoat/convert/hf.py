"""Hugging Face checkpoints in and out: config.json <-> ModelConfig, and literal per-architecture key maps.

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, GPTNeoXForCausalLM,
GPT2LMHeadModel. The fused GPT-2 `c_attn` (a Conv1D, stored input-major) and the NeoX per-head `query_key_value`
are split here so that the model itself only knows q/k/v. Not here: tokenizer logic (tokenizer.py) and the model's
math (model.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from nomoat.checkpoint import Checkpoint, build_model, safetensors_groups, write_files
from nomoat.config import ModelConfig, RunConfig, TrainConfig
from nomoat.errors import UserError
from nomoat.files import atomic_folder, read_json
from nomoat.tokenizer import Tokenizer

ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GPTNeoXForCausalLM",
    "GPT2LMHeadModel",
)  # fmt: skip
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MODEL_TYPES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}  # fmt: skip
# Files copied verbatim between a Hugging Face folder and a nomoat checkpoint, so nothing the user had is lost
# (chat_template.jinja is not among them: Tokenizer.save writes it).
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HF_CONFIG = "hf_config.json"  # the original config.json, kept in nomoat checkpoints for a faithful export


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    hf = read_json(path)
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: architecture {arch} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return hf


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings from either layout: published checkpoints (rope_theta, rope_scaling, rotary_pct,
    rotary_emb_base) or transformers >= 5 (rope_parameters, partial_rotary_factor)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    pct = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    source = params if params.get("rope_type") == "llama3" else scaling
    out: dict[str, Any] = {"rope_theta": float(theta), "rotary_pct": float(pct)}
    if kind == "llama3":
        out |= {
            "rope_scaling": "llama3",
            "rope_factor": float(source["factor"]),
            "rope_low_freq_factor": float(source["low_freq_factor"]),
            "rope_high_freq_factor": float(source["high_freq_factor"]),
            "rope_original_max_seq_len": int(source["original_max_position_embeddings"]),
        }
    elif kind != "default":
        raise UserError(f"config.json: RoPE scaling {kind!r} is not supported (supported: default, llama3)")
    return out


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    arch = hf["architectures"][0]
    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        return ModelConfig(
            vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"],
            d_ff=hf.get("n_inner") or 4 * hf["n_embd"], max_seq_len=hf["n_positions"], norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu" if act == "gelu" else "gelu_tanh",
            pos_emb="learned", bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), init="gpt2",
        )  # fmt: skip
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    common = {
        "vocab_size": hf["vocab_size"], "n_layer": hf["num_hidden_layers"], "n_head": heads,
        "d_model": hf["hidden_size"], "d_ff": hf["intermediate_size"], "max_seq_len": hf["max_position_embeddings"],
        "head_dim": head_dim if head_dim and head_dim != hf["hidden_size"] // heads else None, "pos_emb": "rope",
        "tie_embeddings": hf.get("tie_word_embeddings", False), **_rope(hf),
    }  # fmt: skip
    if arch == "GPTNeoXForCausalLM":
        if not hf.get("attention_bias", True):
            raise UserError("config.json: GPT-NeoX without attention biases is not supported")
        act = hf.get("hidden_act", "gelu")
        return ModelConfig(
            **common, norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-5),
            mlp="gelu" if act == "gelu" else "gelu_tanh", parallel_residual=hf.get("use_parallel_residual", True),
            bias=True, init="neox",
        )  # fmt: skip
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise UserError(f"config.json: {arch} with attention_bias or mlp_bias is not supported")
    if arch == "Qwen3ForCausalLM" and hf.get("use_sliding_window"):
        raise UserError("config.json: Qwen3ForCausalLM with use_sliding_window is not supported")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "MistralForCausalLM") else None
    if window and window < common["max_seq_len"]:
        common["max_seq_len"] = window  # within one window, sliding-window attention is plain causal attention
    return ModelConfig(
        **common, n_kv_head=hf.get("num_key_value_heads") or heads, norm="rmsnorm",
        norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", bias=False, qkv_bias=arch == "Qwen2ForCausalLM",
        qk_norm=arch == "Qwen3ForCausalLM", init="normal", init_std=hf.get("initializer_range", 0.02),
    )  # fmt: skip


def architecture_of(cfg: ModelConfig) -> str:
    """The Hugging Face class that expresses a nomoat config, for models trained here."""
    llama_block = cfg.norm == "rmsnorm" and cfg.mlp == "swiglu" and cfg.pos_emb == "rope" and not cfg.bias
    if cfg.qk_norm and (not llama_block or cfg.qkv_bias):  # Qwen3's attention_bias would add an o_proj bias too
        raise UserError(
            "model.qk_norm matches a Hugging Face architecture (Qwen3) only with rmsnorm, swiglu, rope and no biases"
        )
    if cfg.pos_emb == "learned" and cfg.norm == "layernorm" and cfg.bias and not cfg.parallel_residual:
        return "GPT2LMHeadModel"
    if cfg.norm == "layernorm" and cfg.pos_emb == "rope" and cfg.bias and cfg.mlp != "swiglu":
        return "GPTNeoXForCausalLM"
    if llama_block:
        return "Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"
    raise UserError("this model's switches match no Hugging Face architecture (GPT-2, GPT-NeoX, LLaMA, Qwen2, Qwen3)")


def config_to_hf(cfg: ModelConfig, arch: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json for cfg, starting from the original one when there is one (token ids, dtype, extras)."""
    hf = dict(base or {})
    hf["architectures"] = [arch]
    if arch == "GPT2LMHeadModel":
        hf |= {
            "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_embd": cfg.d_model, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu" if cfg.mlp == "gelu" else "gelu_new",
            "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }  # fmt: skip
        return hf
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        rope |= {
            "rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }  # fmt: skip
    for stale in ("rope_scaling", "rope_parameters", "rope_theta", "rotary_pct", "rotary_emb_base"):
        hf.pop(stale, None)
    hf |= {
        "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "head_dim": cfg.dim_head,
        "max_position_embeddings": hf.get("max_position_embeddings", cfg.max_seq_len),
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
    }  # fmt: skip
    if cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = rope
    if arch == "GPTNeoXForCausalLM":
        hf |= {
            "model_type": "gpt_neox", "rotary_pct": cfg.rotary_pct, "rotary_emb_base": cfg.rope_theta,
            "use_parallel_residual": cfg.parallel_residual, "layer_norm_eps": cfg.norm_eps,
            "hidden_act": "gelu" if cfg.mlp == "gelu" else "gelu_new", "attention_bias": True,
        }  # fmt: skip
    else:
        hf |= {
            "model_type": MODEL_TYPES[arch], "num_key_value_heads": cfg.kv_heads, "rms_norm_eps": cfg.norm_eps,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        }  # fmt: skip
    return hf


# Key maps: one entry per module, ours on the left. GPT-2's Conv1D weights are transposed; "qkv" marks a fused
# projection that is split into q_proj, k_proj and v_proj.
_GPT2_LAYER = {
    "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.qkv": "attn.c_attn",
    "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj",
}  # fmt: skip
_NEOX_LAYER = {
    "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
    "self_attn.qkv": "attention.query_key_value", "self_attn.o_proj": "attention.dense",
    "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h",
}  # fmt: skip
_TOP = {
    "GPT2LMHeadModel": {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f", "lm_head": "lm_head"},
    "GPTNeoXForCausalLM": {
        "embed_tokens": "gpt_neox.embed_in",
        "norm": "gpt_neox.final_layer_norm",
        "lm_head": "embed_out",
    },
}
_IGNORED = (".attn.bias", ".attn.masked_bias", "attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


def _split_qkv(arch: str, cfg: ModelConfig, t: torch.Tensor) -> list[torch.Tensor]:
    H, K, D = cfg.n_head, cfg.kv_heads, cfg.dim_head
    if arch == "GPT2LMHeadModel":  # [q | k | v] along the output features; views, so no copy is made
        return list(t.split([H * D, K * D, K * D], dim=0))
    heads = t.reshape(H, 3, D, *t.shape[1:])  # NeoX interleaves per head: [q_h | k_h | v_h] for each head h
    return [heads[:, j].reshape(H * D, *t.shape[1:]).contiguous() for j in range(3)]


def _join_qkv(arch: str, cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if arch == "GPT2LMHeadModel":
        return torch.cat([q, k, v], dim=0)
    H, D = cfg.n_head, cfg.dim_head
    return torch.stack([t.reshape(H, D, *t.shape[1:]) for t in (q, k, v)], dim=1).reshape(3 * H * D, *q.shape[1:])


def weights_from_hf(arch: str, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and split, transpose) HF tensors into ours; consumes `state` so that memory is freed as it goes."""
    if arch in LLAMA_LIKE:
        return {k.removeprefix("model."): v for k, v in state.items() if not k.endswith(_IGNORED)}
    top = {hf: ours for ours, hf in _TOP[arch].items()}
    if arch == "GPTNeoXForCausalLM":
        top["lm_head"] = "lm_head"  # transformers >= 5 names the output head like the others
    layer_map = {hf: ours for ours, hf in (_GPT2_LAYER if arch == "GPT2LMHeadModel" else _NEOX_LAYER).items()}
    prefix = "transformer.h." if arch == "GPT2LMHeadModel" else "gpt_neox.layers."
    out: dict[str, torch.Tensor] = {}
    for key in list(state):
        t = state.pop(key)  # let each source tensor go once converted: peak memory stays near one copy
        key = key.removeprefix("transformer.") if arch == "GPT2LMHeadModel" else key
        if key.endswith(_IGNORED):
            continue
        module, kind = key.rsplit(".", 1)
        if module in top:
            out[f"{top[module]}.{kind}"] = t
            continue
        i, _, inner = module.removeprefix(prefix.removeprefix("transformer.")).partition(".")
        if not module.startswith(prefix.removeprefix("transformer.")) or inner not in layer_map:
            raise UserError(f"unexpected tensor {key} in a {arch} checkpoint")
        ours = layer_map[inner]
        if arch == "GPT2LMHeadModel" and kind == "weight" and not inner.startswith("ln_"):
            t = t.t()  # Conv1D stores (in, out); a transposed view multiplies as fast as a copy would
        if ours == "self_attn.qkv":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), _split_qkv(arch, cfg, t), strict=True):
                out[f"layers.{i}.self_attn.{name}.{kind}"] = part
        else:
            out[f"layers.{i}.{ours}.{kind}"] = t
    return out


def weights_to_hf(arch: str, cfg: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if cfg.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if arch in LLAMA_LIKE:
        return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state.items()}
    top, layer_map = _TOP[arch], _GPT2_LAYER if arch == "GPT2LMHeadModel" else _NEOX_LAYER
    prefix = "transformer.h." if arch == "GPT2LMHeadModel" else "gpt_neox.layers."
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        module, kind = key.rsplit(".", 1)
        if module in top:
            name = top[module] if module == "lm_head" or arch != "GPT2LMHeadModel" else f"transformer.{top[module]}"
            out[f"{name}.{kind}"] = t
            continue
        _, i, inner = module.split(".", 2)
        if inner in ("self_attn.k_proj", "self_attn.v_proj"):
            continue  # written with q_proj
        if inner == "self_attn.q_proj":
            qkv = [state[f"layers.{i}.self_attn.{p}.{kind}"] for p in ("q_proj", "k_proj", "v_proj")]
            t, inner = _join_qkv(arch, cfg, *qkv), "self_attn.qkv"
        if arch == "GPT2LMHeadModel" and kind == "weight" and not inner.endswith("layernorm"):
            t = t.t()
        out[f"{prefix}{i}.{layer_map[inner]}.{kind}"] = t.contiguous()
    return out


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index}: not a safetensors index ({e})") from None
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    if (folder / "pytorch_model.bin").is_file():
        raise UserError(f"{folder}: only pytorch_model.bin (a pickle); convert it to safetensors first")
    raise UserError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def load_hf(folder: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """A Hugging Face model folder as a nomoat Checkpoint, with no change in a single logit. On device "meta" no
    weight is read (see load_checkpoint)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    arch = hf["architectures"][0]
    cfg = config_from_hf(hf)
    files = _weight_files(folder)

    def groups(meta: bool) -> Iterator[dict[str, torch.Tensor]]:
        for group in safetensors_groups(files, meta):
            yield weights_from_hf(arch, cfg, group)

    lazy = torch.device(device).type == "meta"
    state = {k: v for group in groups(lazy) for k, v in group.items()}
    model = build_model(cfg, state, str(files[0] if len(files) == 1 else folder)).to(device)
    tokenizer = _load_tokenizer(folder)
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len)))
    return Checkpoint(folder, run, model, tokenizer, None, groups if lazy else None)


def _load_tokenizer(folder: Path) -> Tokenizer:
    """tokenizer.json with its eos token, bos token and chat template from the side files (Tokenizer.load)."""
    return Tokenizer.load(folder / "tokenizer.json")


def hf_layout(ckpt: Checkpoint) -> tuple[str, dict[str, Any]]:
    """(Hugging Face class, config.json) that ckpt exports as, built on the original config.json where the
    checkpoint kept one (so that fields nomoat does not model survive)."""
    if ckpt.cfg.model.quantize is not None:
        raise UserError(f"{ckpt.path}: holds {ckpt.cfg.model.quantize} weights; export the model it was made from")
    base_file = ckpt.path / (HF_CONFIG if (ckpt.path / HF_CONFIG).is_file() else "config.json")
    base = read_json(base_file) if base_file.is_file() else {}
    arch = (base.get("architectures") or [architecture_of(ckpt.cfg.model)])[0]
    return arch, config_to_hf(ckpt.cfg.model, arch, base)


def copy_side_files(src: Path, dst: Path) -> list[Path]:
    """The Hugging Face side files of src copied into dst under the names a nomoat checkpoint keeps them by
    (its original config.json as hf_config.json), so that a model exports back to the layout it came in."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    config = src / HF_CONFIG if (src / HF_CONFIG).is_file() else src / "config.json"
    if config.is_file():
        copied.append(Path(shutil.copy(config, dst / HF_CONFIG)))
    copied += [Path(shutil.copy(src / name, dst / name)) for name in SIDE_FILES if (src / name).is_file()]
    return copied


def from_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Convert a Hugging Face folder into a nomoat checkpoint folder (atomically; nothing is left on failure)."""
    hf_dir = Path(hf_dir)
    ckpt = load_hf(hf_dir)
    with atomic_folder(out) as tmp:
        write_files(tmp, ckpt.model, ckpt.cfg, ckpt.tokenizer)
        copy_side_files(hf_dir, tmp)
    return Path(out)


def to_hf(
    ckpt: Checkpoint, out: str | Path, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write a folder that transformers' AutoModelForCausalLM.from_pretrained loads with no missing keys."""
    arch, hf = hf_layout(ckpt)
    state = {k: v.detach().cpu() for k, v in ckpt.model.state_dict().items()}
    state = weights_to_hf(arch, ckpt.cfg.model, state)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    # transformers 5 reads "dtype" and 4 "torch_dtype"; an original config may hold either, so both say the same
    hf["dtype"] = hf["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    if ckpt.tokenizer.eos_id is not None:
        hf.setdefault("eos_token_id", ckpt.tokenizer.eos_id)
    with atomic_folder(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
        _save_sharded(state, tmp, max_shard_bytes)
        ckpt.tokenizer.save(tmp / "tokenizer.json")
        for name in SIDE_FILES:
            if (ckpt.path / name).is_file():
                shutil.copy(ckpt.path / name, tmp / name)
        if not (tmp / "tokenizer_config.json").is_file():
            (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(ckpt.tokenizer), indent=2) + "\n")
    return Path(out)


def _tokenizer_config(tok: Tokenizer) -> dict[str, Any]:
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000_000}
    if tok.eos_token:
        cfg |= {"eos_token": tok.eos_token, "bos_token": tok.bos_token or tok.eos_token}
    return cfg


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, name)
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
