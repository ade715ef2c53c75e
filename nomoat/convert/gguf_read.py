"""GGUF files (llama.cpp's format) in: metadata, tensors and tokenizer read back into a nomoat Checkpoint.

What llama.cpp's convert_hf_to_gguf.py does is undone here (tensor names, the LLaMA Q/K row permutation, the
fused GPT-2/NeoX qkv, Llama 3's rope_freqs), so that hf.py's config and key maps do the rest. Quantized tensors
are dequantized to fp32, or, for load_model's quantize, taken a block at a time into int8/int4 (Q4_0 as it is).
Not here: writing GGUF (gguf_write.py), other tokenizers than llama.cpp's BPE and SPM.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from nomoat.checkpoint import Checkpoint, build_model, write_files
from nomoat.config import ModelConfig, RunConfig, TrainConfig
from nomoat.convert.hf import config_from_hf, weights_from_hf
from nomoat.errors import UserError
from nomoat.files import atomic_folder
from nomoat.model import Transformer
from nomoat.quant import Int4Weight, quantize_streamed
from nomoat.tokenizer import Tokenizer

# GGUF architecture -> the Hugging Face class whose config and key map hf.py knows.
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "gptneox": "GPTNeoXForCausalLM",
}
QUANT_TYPES = (
    "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
)  # fmt: skip

# Literal key maps, GGUF names on the left (gguf-py's constants.py names them); "N" is the block number.
_LLAMA = {
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.N.attn_norm": "model.layers.N.input_layernorm", "blk.N.attn_q": "model.layers.N.self_attn.q_proj",
    "blk.N.attn_k": "model.layers.N.self_attn.k_proj", "blk.N.attn_v": "model.layers.N.self_attn.v_proj",
    "blk.N.attn_output": "model.layers.N.self_attn.o_proj", "blk.N.ffn_norm": "model.layers.N.post_attention_layernorm",
    "blk.N.ffn_gate": "model.layers.N.mlp.gate_proj", "blk.N.ffn_up": "model.layers.N.mlp.up_proj",
    "blk.N.ffn_down": "model.layers.N.mlp.down_proj",
}  # fmt: skip
_GPT2 = {
    "token_embd": "transformer.wte", "position_embd": "transformer.wpe", "output_norm": "transformer.ln_f",
    "output": "lm_head", "blk.N.attn_norm": "transformer.h.N.ln_1", "blk.N.attn_qkv": "transformer.h.N.attn.c_attn",
    "blk.N.attn_output": "transformer.h.N.attn.c_proj", "blk.N.ffn_norm": "transformer.h.N.ln_2",
    "blk.N.ffn_up": "transformer.h.N.mlp.c_fc", "blk.N.ffn_down": "transformer.h.N.mlp.c_proj",
}  # fmt: skip
_NEOX = {
    "token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm", "output": "embed_out",
    "blk.N.attn_norm": "gpt_neox.layers.N.input_layernorm",
    "blk.N.attn_qkv": "gpt_neox.layers.N.attention.query_key_value",
    "blk.N.attn_output": "gpt_neox.layers.N.attention.dense",
    "blk.N.ffn_norm": "gpt_neox.layers.N.post_attention_layernorm",
    "blk.N.ffn_up": "gpt_neox.layers.N.mlp.dense_h_to_4h", "blk.N.ffn_down": "gpt_neox.layers.N.mlp.dense_4h_to_h",
}  # fmt: skip
_QWEN3 = _LLAMA | {
    "blk.N.attn_q_norm": "model.layers.N.self_attn.q_norm", "blk.N.attn_k_norm": "model.layers.N.self_attn.k_norm",
}  # fmt: skip
_KEY_MAPS = {"llama": _LLAMA, "qwen2": _LLAMA, "qwen3": _QWEN3, "gpt2": _GPT2, "gptneox": _NEOX}

# tokenizer.ggml.pre -> the regexes llama.cpp splits text with, applied in turn (src/llama-vocab.cpp).
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_RE = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-2": [_GPT2_RE],
    "olmo": [_GPT2_RE],
    "default": [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"],
    "llama-bpe": [_LLAMA3_RE],
    "llama3": [_LLAMA3_RE],
    "qwen2": [_LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")],
    "smollm": [r"\p{N}", _GPT2_RE],
}
_IGNORE_MERGES = ("llama-bpe", "llama3")  # llama.cpp takes a whole-word vocabulary hit before any merge
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4  # tokenizer.ggml.token_type values (gguf-py's TokenType)


def _open(path: Path) -> Any:
    import gguf

    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ... for a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a readable GGUF file ({reason})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """A GGUF file's key-value metadata, without reading its tensors (for `nomoat info`)."""
    return _metadata(_open(Path(path)))


def _metadata(reader: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, where: str) -> dict[str, Any]:
    """Hugging Face's llama3 rope_scaling from the per-frequency factors llama.cpp stores instead.

    The factors depend only on low/high_freq_factor divided by original_max_position_embeddings, so that is
    fixed at Llama 3.1's 8192 and the two ratios are fitted: exactly where the blend is sampled twice or more,
    anywhere inside the gap between the kept and the slowed frequencies otherwise."""
    inv_wavelen = (theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)) / (2 * math.pi)
    factor, r = float(factors.max()), factors.astype(np.float64)
    if factor <= 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    low, high = np.isclose(r, factor, rtol=1e-6), np.isclose(r, 1.0, rtol=1e-6)
    blend = ~(low | high)
    s = (1 / r[blend] - 1 / factor) / (1 - 1 / factor)  # smooth = (L / wavelen - lo) / (hi - lo)
    x = inv_wavelen[blend]
    if len(x) >= 2:
        slope, icept = np.polyfit(x, s, 1)
        a, b = -icept / slope, (1 - icept) / slope  # lo / L, hi / L
    else:
        gap_lo = inv_wavelen[low].max(initial=0.0)
        gap_hi = inv_wavelen[high].min(initial=2 * inv_wavelen.max())
        if len(x) == 1:
            d = 0.5 * min((x[0] - gap_lo) / max(s[0], 1e-12), (gap_hi - x[0]) / max(1 - s[0], 1e-12))
            a, b = x[0] - s[0] * d, x[0] + (1 - s[0]) * d
        else:
            a, b = gap_lo + (gap_hi - gap_lo) / 3, gap_lo + 2 * (gap_hi - gap_lo) / 3
    L = 8192
    lo, hi = (round(v, 4) if abs(v - round(v, 4)) < 1e-6 else v for v in (a * L, b * L))
    smooth = np.clip((inv_wavelen - lo / L) / ((hi - lo) / L), 0.0, 1.0)  # 0: slowed by factor, 1: kept
    if not np.allclose(1 / ((1 - smooth) / factor + smooth), r, rtol=1e-4):
        raise UserError(f"{where}: rope_freqs does not follow Llama 3's RoPE scaling, the only kind supported")
    return {
        "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": float(lo),
        "high_freq_factor": float(hi), "original_max_position_embeddings": L,
    }  # fmt: skip


_REQUIRED = object()


def _hf_config(arch: str, meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> dict[str, Any]:
    """The config.json that convert_hf_to_gguf.py read, as far as the model's math depends on it."""

    def get(key: str, default: Any = _REQUIRED) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise UserError(f"{where}: GGUF metadata {arch}.{key} is missing")
        return value

    if "token_embd.weight" not in shapes:
        raise UserError(f"{where}: no tensor token_embd.weight")
    vocab, tied = shapes["token_embd.weight"][0], "output.weight" not in shapes
    heads, width = get("attention.head_count"), get("embedding_length")
    hf: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "vocab_size": vocab, "tie_word_embeddings": tied}
    if arch == "gpt2":
        return hf | {
            "n_layer": get("block_count"), "n_head": heads, "n_embd": width, "n_inner": get("feed_forward_length"),
            "n_positions": get("context_length"), "layer_norm_epsilon": get("attention.layer_norm_epsilon"),
            "activation_function": "gelu_new",  # llama.cpp's GPT-2 graph uses the tanh approximation
        }  # fmt: skip
    hf |= {
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads, "hidden_size": width,
        "intermediate_size": get("feed_forward_length"), "max_position_embeddings": get("context_length"),
        "head_dim": get("attention.key_length", width // heads), "rope_theta": float(get("rope.freq_base", 10000.0)),
    }  # fmt: skip
    if arch == "gptneox":
        return hf | {
            "rotary_pct": get("rope.dimension_count", hf["head_dim"]) / hf["head_dim"],
            "use_parallel_residual": bool(get("use_parallel_residual", True)),
            "layer_norm_eps": get("attention.layer_norm_epsilon"), "hidden_act": "gelu",
        }  # fmt: skip
    return hf | {
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
    }


def _dequantize(path: Path, t: Any) -> torch.Tensor:
    from gguf.quants import dequantize

    if t.tensor_type.name not in QUANT_TYPES:
        supported = ", ".join(QUANT_TYPES)
        raise UserError(
            f"{path}: tensor {t.name} has type {t.tensor_type.name}, not supported (supported: {supported})"
        )
    shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
    # "O": an array of our own, not a view of the read-only memory map
    return torch.from_numpy(np.require(dequantize(t.data, t.tensor_type), np.float32, ["C", "W", "O"])).reshape(shape)


def _unpermute(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: GGML rotates interleaved pairs, HF the two halves."""
    return t.reshape(heads, t.shape[0] // heads // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _hf_tensor(arch: str, hf: dict[str, Any], name: str, t: torch.Tensor) -> torch.Tensor:
    """One tensor back in the layout the Hugging Face checkpoint had."""
    if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
        return _unpermute(t, hf["num_attention_heads"])
    if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
        return _unpermute(t, hf["num_key_value_heads"])
    if arch == "gpt2" and name.endswith(".weight") and ".h." in name and ".ln_" not in name:
        return t.t()  # Conv1D stores (in, out); weights_from_hf transposes it back as a view
    if arch == "gptneox" and "query_key_value" in name:  # [q | k | v] back to NeoX's per-head [q_h | k_h | v_h]
        H = hf["num_attention_heads"]
        return t.reshape(3, H, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
    return t


def _hf_name(arch: str, name: str, where: str) -> str | None:
    module, _, kind = name.rpartition(".")
    if module == "rope_freqs":
        return None  # folded into the config's rope_scaling
    parts = module.split(".")
    block = parts[1] if parts[0] == "blk" and len(parts) == 3 else None
    key = f"blk.N.{parts[2]}" if block is not None else module
    hf = _KEY_MAPS[arch].get(key)
    if hf is None:
        raise UserError(f"{where}: unexpected tensor {name} for GGUF architecture {arch}")
    return f"{hf.replace('.N.', f'.{block}.')}.{kind}"


def _config(path: Path, reader: Any, meta: dict[str, Any]) -> tuple[str, dict[str, Any], ModelConfig]:
    """(GGUF architecture, Hugging Face config.json, nomoat config) of the file."""
    arch = meta["general.architecture"]
    shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
    hf = _hf_config(arch, meta, shapes, str(path))
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        factors = _dequantize(path, tensors["rope_freqs.weight"]).numpy()
        hf["rope_scaling"] = _llama3_rope(factors, hf["rope_theta"], hf["head_dim"], str(path))
    return arch, hf, config_from_hf(hf)


def _model(path: Path, reader: Any, meta: dict[str, Any]) -> tuple[ModelConfig, Transformer]:
    arch, hf, cfg = _config(path, reader, meta)
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for name, t in tensors.items():  # one tensor at a time: peak memory stays near one fp32 copy
        hf_name = _hf_name(arch, name, str(path))
        if hf_name is not None:
            state[hf_name] = _hf_tensor(arch, hf, hf_name, _dequantize(path, t))
        _release(reader, t)
    return cfg, build_model(cfg, weights_from_hf(hf["architectures"][0], cfg, state), str(path))


def _quantized_model(path: Path, reader: Any, meta: dict[str, Any], bits: str) -> tuple[ModelConfig, Transformer]:
    """The model in int8/int4 (quant.quantize_streamed), read a block at a time, so that memory stays near the
    quantized model's plus one tensor in fp32. With int4, a block projection stored as Q4_0 is taken as it is:
    a Q4_0 block (32 weights, an fp16 scale d, values (q - 8) * d) is an int4 group of scale d and offset 0 (the
    value of code 8), so only d is rounded, to the kernel's bf16. Any other tensor is dequantized, one at a
    time, and quantized as quantize_weights does: a Q8_0 projection, with a scale per 32 weights, is requantized
    to int8 with one scale per row, since the kernel has only that."""
    arch, hf, cfg = _config(path, reader, meta)
    cls = hf["architectures"][0]
    shapes = {}  # a skeleton first, named and checked as a float load would be
    for t in reader.tensors:
        if (name := _hf_name(arch, t.name, str(path))) is not None:
            empty = torch.empty(tuple(int(n) for n in reversed(t.shape)), device="meta")
            shapes[name] = _hf_tensor(arch, hf, name, empty)
    skeleton = build_model(cfg, weights_from_hf(cls, cfg, shapes), str(path))
    groups = (weights_from_hf(cls, cfg, group) for group in _hf_groups(path, reader, arch, hf, bits))
    ours = ({k: _q4_0(v) if v.dtype == torch.uint8 else v for k, v in group.items()} for group in groups)
    return cfg, quantize_streamed(skeleton, ours, bits, where=str(path))


def _hf_groups(path: Path, reader: Any, arch: str, hf: dict[str, Any], bits: str) -> Iterator[dict[str, torch.Tensor]]:
    """The file's tensors in Hugging Face names and layout, the top-level ones first, then a block at a time. With
    int4, a block projection stored as Q4_0 comes as its raw blocks, a uint8 row of 18 bytes per 32 weights: a row
    holds whole blocks, so the layout's reorderings of rows (_hf_tensor, weights_from_hf) apply to it as they are."""
    blocks: dict[int, list[Any]] = {}
    for t in reader.tensors:
        blocks.setdefault(int(t.name.split(".")[1]) if t.name.startswith("blk.") else -1, []).append(t)
    for block in sorted(blocks):
        group = {}
        for t in blocks[block]:
            if (name := _hf_name(arch, t.name, str(path))) is not None:
                raw = bits == "int4" and block >= 0 and t.tensor_type.name == "Q4_0" and len(t.shape) == 2
                data = torch.from_numpy(np.array(t.data)) if raw else _dequantize(path, t)
                group[name] = _hf_tensor(arch, hf, name, data)
            _release(reader, t)
        yield group


def _q4_0(raw: torch.Tensor) -> Int4Weight:
    """Q4_0 rows (n, k / 32 * 18 bytes) as int4 groups: each block an fp16 scale d, then 16 bytes whose low
    nibbles are its values 0-15 and high nibbles 16-31 (ggml's block_q4_0); offset 0, since code 8 stands for 0."""
    blocks = raw.contiguous().reshape(raw.shape[0], -1, 18)  # (n, k / 32, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1).float()  # (n, k / 32)
    codes = torch.cat([blocks[..., 2:] & 15, blocks[..., 2:] >> 4], -1).reshape(raw.shape[0], -1)  # (n, k)
    return Int4Weight(codes, d, torch.zeros_like(d))


def _release(reader: Any, t: Any) -> None:
    """Drop the file pages a tensor was read from once it is copied out: they would otherwise stay resident
    beside the copy while the reader is open, so the peak would be two copies of the weights, not one."""
    mm = getattr(reader.data, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return
    start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, t.data_offset + t.n_bytes - start)


def _bpe(meta: dict[str, Any], where: str) -> tokenizers.Tokenizer:
    """llama.cpp's BPE tokenizer (`gpt2` model) as a Hugging Face one: byte-level pieces, ranked merges."""
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{where}: pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    hf = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [pre_tokenizers.Split(tokenizers.Regex(r), behavior="isolated") for r in PRE_TOKENIZERS[pre]]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    return hf


def _spm(meta: dict[str, Any]) -> tokenizers.Tokenizer:
    """llama.cpp's SentencePiece tokenizer (`llama` model) as a BPE, as transformers' GGUF loader builds it:
    llama.cpp merges the adjacent pair whose union scores best, so the merges are all splits of a token into
    two tokens, best-scoring union first; characters outside the vocabulary fall back to <0xXX> byte tokens."""
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    ranked = sorted(
        (-score, i, len(tok[:k]), tok[:k], tok[k:])
        for i, (tok, score) in enumerate(zip(tokens, scores, strict=True))
        for k in range(1, len(tok))
        if tok[:k] in vocab and tok[k:] in vocab
    )
    unk = next((tok for tok, kind in zip(tokens, types, strict=True) if kind == UNKNOWN), None)
    hf = tokenizers.Tokenizer(
        models.BPE(vocab, [(a, b) for *_, a, b in ranked], unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # llama.cpp puts a space before every stretch of text that starts the input or follows a special token
    prefix = [normalizers.Prepend("\u2581")] if meta.get("tokenizer.ggml.add_space_prefix", True) else []
    hf.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", "\u2581")])
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    hf.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return hf


def _add_special_tokens(hf: tokenizers.Tokenizer, meta: dict[str, Any]) -> None:
    """Control tokens as special, user-defined ones as plain added tokens: llama.cpp matches both whole."""
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    added = [
        tokenizers.AddedToken(tok, special=kind == CONTROL, normalized=False)
        for tok, kind in zip(tokens, types, strict=True)
        if kind in (CONTROL, USER_DEFINED)
    ]
    hf.add_special_tokens([a for a in added if a.special])
    hf.add_tokens([a for a in added if not a.special])


def _tokenizer(path: Path, meta: dict[str, Any]) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in meta:
        raise UserError(f"{path}: no tokenizer (tokenizer.ggml.model and tokenizer.ggml.tokens)")
    if kind not in ("gpt2", "llama"):
        raise UserError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    hf = _bpe(meta, str(path)) if kind == "gpt2" else _spm(meta)
    _add_special_tokens(hf, meta)
    tokens = meta["tokenizer.ggml.tokens"]
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None and bos_id < len(tokens) else None
    eos = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else None
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", False):
        # Only for transformers users of the saved tokenizer.json: nomoat's encode adds no special tokens.
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return Tokenizer(hf, eos_token=eos, chat_template=meta.get("tokenizer.chat_template"), bos_token=bos)


def load_gguf(path: str | Path, device: str | torch.device = "cpu", quantize: str | None = None) -> Checkpoint:
    """A GGUF file as a nomoat Checkpoint in fp32: exact for F32/F16/BF16 files, dequantized otherwise; or, with
    quantize ("int8", "int4"), in int8/int4 on the CPU, never whole in fp32 (_quantized_model)."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    tokenizer = _tokenizer(path, meta)
    cfg, model = _model(path, reader, meta) if quantize is None else _quantized_model(path, reader, meta, quantize)
    train = TrainConfig(seq_len=min(TrainConfig.seq_len, cfg.max_seq_len))
    run = RunConfig(model=dataclasses.replace(cfg, quantize=quantize), train=train)
    return Checkpoint(path, run, model.to(device), tokenizer, None)


def from_gguf(path: str | Path, out: str | Path) -> Path:
    """Convert a GGUF file into a nomoat checkpoint folder (atomically; nothing is left on failure)."""
    ckpt = load_gguf(path)
    tok = ckpt.tokenizer
    # bos and eos live in the side file Tokenizer.load reads (add_bos_token is tokenizer.json's post-processor)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tok.bos_token, "eos_token": tok.eos_token}
    with atomic_folder(out) as tmp:
        write_files(tmp, ckpt.model, ckpt.cfg, tok)
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)
