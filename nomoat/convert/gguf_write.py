"""GGUF export: a Checkpoint (or a LoRA adapter) as the file llama.cpp's own convert_hf_to_gguf.py (or
convert_lora_to_gguf.py) would make of its Hugging Face layout: the LLaMA q/k permutation, Llama 3's rope_freqs,
NeoX's q|k|v regrouping, TensorNameMap names, the same tensor types and metadata, written tensor by tensor and
atomically. Byte-level BPE vocabularies go out as llama.cpp's `gpt2` tokenizer under the pre-tokenizer its
converter would name; SentencePiece-style ones (▁ for spaces, byte fallback: Llama 2, Mistral, TinyLlama) as its
`llama` (SPM) tokenizer, with scores that make its best-pair merging follow the BPE's merge ranks. Not here:
reading GGUF (gguf_read.py), k-quant exports.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from nomoat.checkpoint import Checkpoint
from nomoat.config import ModelConfig, from_dict, read_toml
from nomoat.convert.hf import architecture_of, hf_layout, weights_to_hf
from nomoat.errors import UserError
from nomoat.files import atomic_file, read_json
from nomoat.lora import ADAPTER_WEIGHTS, lora_layers, read_adapter_config
from nomoat.tokenizer import Tokenizer

QTYPES = {
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
GGUF_ARCH = {
    "LlamaForCausalLM": gguf.MODEL_ARCH.LLAMA,
    "MistralForCausalLM": gguf.MODEL_ARCH.LLAMA,  # llama.cpp's converter files Mistral under llama
    "Qwen2ForCausalLM": gguf.MODEL_ARCH.QWEN2,
    "Qwen3ForCausalLM": gguf.MODEL_ARCH.QWEN3,  # Qwen2's layout plus attn_q_norm/attn_k_norm; q and k unpermuted
    "GPT2LMHeadModel": gguf.MODEL_ARCH.GPT2,
    "GPTNeoXForCausalLM": gguf.MODEL_ARCH.GPTNEOX,
}

# get_vocab_base_pre in convert_hf_to_gguf.py: a BPE pre-tokenizer is recognised by the sha256 of str(ids) for
# this probe text, encoded as AutoTokenizer.encode does (with special tokens). Hashes below are llama.cpp's own.
PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3-8B
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3-Embedding-0.6B
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM-135M
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",  # GPT-NeoX-20B's (OLMo, MPT)
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Smaug-Llama-3-70B
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # starcoder2-3b
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo-Base-2407
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",  # microsoft/phi-2
}
# gguf.TokenType values, as llama.cpp's converter assigns them
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's ▁, which stands for a space


def to_gguf(ckpt: Checkpoint, out: str | Path, qtype: str = "f32", lineage: dict[str, Any] | None = None) -> Path:
    """Write ckpt as one GGUF file of type qtype (f32, f16, bf16, q8_0 or q4_0); `lineage` goes in as JSON under
    nomoat.lineage. Everything is checked before the file is opened; on any error nothing is left at `out`."""
    if qtype not in QTYPES:
        raise UserError(f"unknown GGUF type {qtype!r} (choose from {', '.join(QTYPES)})")
    cfg = ckpt.cfg.model
    if lora_layers(ckpt.model):
        raise UserError("the model holds LoRA layers: merge them into it first, or export them with adapter_to_gguf")
    arch, hf = gguf_layout(ckpt)
    if cfg.rope_scaling == "llama3" and GGUF_ARCH[arch] != gguf.MODEL_ARCH.LLAMA:
        raise UserError(f"llama3 RoPE scaling on {arch} has no GGUF form (llama.cpp applies it to LLaMA only)")
    # A first pass plans the tensor table, which precedes the data, from shapes alone (meta tensors); the
    # second reads, converts and quantizes one tensor at a time as it is written.
    plan = [(name, tuple(t.shape)) for name, t in gguf_tensors(ckpt, arch, meta=True)]
    plan = [(name, shape, tensor_type(name, shape, qtype)) for name, shape in plan]
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    _add_general(writer, ckpt, qtype, lineage)
    _add_hparams(writer, arch, hf, cfg)
    _add_vocab(writer, ckpt.tokenizer, cfg.vocab_size, ckpt.path)
    for name, shape, kind in plan:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        writer.add_tensor_info(name, shape, np.dtype(np.float32), math.prod(shape) // block * size, raw_dtype=kind)
    tensors = zip(gguf_tensors(ckpt, arch, meta=False), plan, strict=True)
    return _write(writer, Path(out), (gguf.quants.quantize(t.numpy(), kind) for (_, t), (_, _, kind) in tensors))


def _write(writer: gguf.GGUFWriter, out: Path, data: Iterator[np.ndarray] | None = None) -> Path:
    """Header, metadata, tensor table, then each array of `data` in table order as it comes (or, with no
    `data`, the tensors the writer holds), into a temporary file that is flushed to disk and renamed to `out`."""
    with atomic_file(out) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            if data is None:
                writer.write_tensors_to_file()
            else:
                writer.write_ti_data_to_file()
                for array in data:
                    writer.write_tensor_data(array)
            writer.flush()
            os.fsync(writer.fout[0].fileno())  # type: ignore[index]
        finally:
            writer.close()
    return out


def gguf_layout(ckpt: Checkpoint) -> tuple[str, dict[str, Any]]:
    """(Hugging Face class, config.json) for ckpt, as to_hf writes them, refused where GGUF has no form."""
    arch, hf = hf_layout(ckpt)
    if arch not in GGUF_ARCH:
        raise UserError(f"architecture {arch} has no GGUF export (supported: {', '.join(GGUF_ARCH)})")
    return arch, hf


# ---- tensors ----


def tensor_type(name: str, shape: tuple[int, ...], qtype: str) -> Q:
    """The converter's choice: norms, biases, 1-D tensors and learned positions stay F32, the rest take qtype
    (token embedding and output head included). A row a block type cannot hold is an error, not a fallback."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32
    if name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight":
        return Q.F32
    kind = QTYPES[qtype][0]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if shape[-1] % block:
        raise UserError(
            f"tensor {name} has rows of {shape[-1]} values, which {qtype} cannot split into blocks of {block}; "
            "export it as f16 (or bf16, f32) instead"
        )
    return kind


def _hf_tensors(ckpt: Checkpoint, arch: str, meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors in Hugging Face layout, converted a layer at a time so that at most one layer's fused
    or transposed copies exist at once; with meta=True, meta tensors of the same shapes, for planning. A model
    loaded as a skeleton (device "meta") is read from its files, a layer at a time, as it goes."""
    if ckpt.weights is not None:
        groups = ckpt.weights(meta)
    else:
        by_layer: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in ckpt.model.state_dict().items():
            layer = key.split(".")[1] if key.startswith("layers.") else ""
            by_layer.setdefault(layer, {})[key] = t.detach().to("meta") if meta else t.detach().cpu()
        groups = iter(by_layer.values())
    for group in groups:
        yield from weights_to_hf(arch, ckpt.cfg.model, group).items()


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's half-split rotary layout to the interleaved pairs llama.cpp's LLaMA rope rotates (LlamaModel.permute)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _as_llamacpp(arch: str, cfg: ModelConfig, name: str, t: torch.Tensor) -> torch.Tensor:
    """What convert_hf_to_gguf.py's modify_tensors does to one HF tensor of this class before naming it."""
    if GGUF_ARCH[arch] == gguf.MODEL_ARCH.LLAMA and name.endswith(("q_proj.weight", "q_proj.bias")):
        return _permute(t, cfg.n_head)
    if GGUF_ARCH[arch] == gguf.MODEL_ARCH.LLAMA and name.endswith(("k_proj.weight", "k_proj.bias")):
        return _permute(t, cfg.kv_heads)
    if arch == "GPT2LMHeadModel" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
        return t.t()  # Conv1D's (in, out) back to (out, in)
    if arch == "GPTNeoXForCausalLM" and name.endswith(("query_key_value.weight", "query_key_value.bias")):
        heads = t.reshape(cfg.n_head, 3, cfg.dim_head, *t.shape[1:])  # per head [q_h | k_h | v_h] to [q | k | v]
        return torch.cat([heads[:, j].reshape(-1, *t.shape[1:]) for j in range(3)], dim=0)
    return t


def _llama3_factors(cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's per-frequency divisors as the rope_freqs tensor llama.cpp reads (LlamaModel's extra tensor)."""
    dim = cfg.dim_head
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    wavelen = 2 * math.pi / freqs
    old, low, high = cfg.rope_original_max_seq_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    smooth = (old / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / cfg.rope_factor + smooth)
    return torch.where(wavelen < old / high, 1.0, torch.where(wavelen > old / low, cfg.rope_factor, blended))


def gguf_tensors(ckpt: Checkpoint, arch: str, meta: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 or float16 tensor) for every tensor, in the order the file holds them."""
    cfg = ckpt.cfg.model
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], cfg.n_layer)
    if cfg.rope_scaling == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_factors(cfg)
    for name, t in _hf_tensors(ckpt, arch, meta):
        if t.dtype not in (torch.float16, torch.float32):
            t = t.float()  # as the converter: bf16 and others go through fp32
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(f"tensor {name} has no GGUF name in llama.cpp's {arch} map")
        yield new, _as_llamacpp(arch, cfg, name, t).contiguous()


# ---- metadata ----


def _add_general(writer: gguf.GGUFWriter, ckpt: Checkpoint, qtype: str, lineage: dict[str, Any] | None) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    name = ckpt.path.parent.parent.name if ckpt.path.name.startswith("step_") else ckpt.path.name
    writer.add_name(name or "nomoat")
    writer.add_file_type(QTYPES[qtype][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if lineage is not None:
        writer.add_string("nomoat.lineage", json.dumps(lineage, sort_keys=True, default=str))


def _add_hparams(writer: gguf.GGUFWriter, arch: str, hf: dict[str, Any], cfg: ModelConfig) -> None:
    """The hyperparameter keys that set_gguf_parameters of the converter's class writes."""
    writer.add_block_count(cfg.n_layer)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    if arch == "GPT2LMHeadModel":
        writer.add_context_length(hf["n_positions"])
        writer.add_layer_norm_eps(hf["layer_norm_epsilon"])
        return
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_rope_freq_base(cfg.rope_theta)
    if arch == "GPTNeoXForCausalLM":
        writer.add_rope_dimension_count(cfg.rotary_dim)
        writer.add_parallel_residual(cfg.parallel_residual)
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_key_length(cfg.dim_head)
    writer.add_value_length(cfg.dim_head)
    if GGUF_ARCH[arch] == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(cfg.dim_head)


def _is_gpt2_byte_level(spec: dict[str, Any]) -> bool:
    """GPT-2's own pre-tokenization (its regex, then bytes to characters, no prefix space): llama.cpp's gpt-2."""
    pre = spec.get("pre_tokenizer") or {}
    return (
        spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and not pre.get("add_prefix_space")
        and pre.get("use_regex", True)
    )


def _rebuilt_pre(spec: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer that a tokenizer read from GGUF (gguf_read's Split regexes, then bytes) was
    built from, so that a GGUF read in is written out under the same name."""
    from nomoat.convert.gguf_read import PRE_TOKENIZERS

    steps = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("use_regex", True):
        return None
    if any(s.get("type") != "Split" or s.get("behavior") != "Isolated" for s in steps[:-1]):
        return None
    regexes = [(s.get("pattern") or {}).get("Regex") for s in steps[:-1]]
    return next((name for name, known in PRE_TOKENIZERS.items() if known == regexes), None)


def _describe(step: dict[str, Any] | None) -> str:
    """A pre-tokenizer as a short name: "ByteLevel", "Sequence[Split, ByteLevel]", "none"."""
    if not step:
        return "none"
    inner = step.get("pretokenizers")
    return f"Sequence[{', '.join(_describe(s) for s in inner)}]" if inner else str(step.get("type"))


def pre_tokenizer(tok: Tokenizer, spec: dict[str, Any] | None = None) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer, found as its converter finds it (the probe hash),
    or from the tokenizer's structure for GPT-2-style byte-level BPE such as the one nomoat trains."""
    spec = spec or json.loads(tok.hf.to_str())
    model = spec.get("model") or {}
    described = _describe(spec.get("pre_tokenizer"))
    if model.get("type") != "BPE" or model.get("byte_fallback") or "Metaspace" in described:
        raise UserError(
            f"tokenizer: a {model.get('type')} vocabulary with pre-tokenizer {described} and byte_fallback "
            f"{bool(model.get('byte_fallback'))} is neither byte-level BPE nor SentencePiece-style (▁ for spaces, "
            "byte fallback), the two that llama.cpp tokenizes as Hugging Face does"
        )
    probe = hashlib.sha256(str(tok.hf.encode(PROBE).ids).encode()).hexdigest()
    if probe in KNOWN_PRE:
        return KNOWN_PRE[probe]
    if _is_gpt2_byte_level(spec):
        return "gpt-2"
    if rebuilt := _rebuilt_pre(spec):
        return rebuilt
    raise UserError(
        f"tokenizer: its pre-tokenizer {described} (probe hash {probe[:12]}) matches none that llama.cpp "
        "implements, so llama.cpp would split text differently"
    )


def _tokens(tok: Tokenizer, n_vocab: int, spm: bool = False, unk: str | None = None) -> tuple[list[str], list[int]]:
    """Token strings and types for ids 0..n_vocab-1 (get_vocab_base): holes become [PADi] UNUSED; in a
    SentencePiece-style vocabulary <0xXX> pieces are BYTE and the model's unk token UNKNOWN."""
    by_id = {i: t for t, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= n_vocab:
        raise UserError(f"tokenizer has token id {max(by_id)} but the model's vocabulary is {n_vocab}")
    added = tok.hf.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif spm and text == unk:
            tokens.append(text)
            types.append(UNKNOWN)
        elif i in added:
            special = added[i].special or text.startswith("<|") and text.endswith("|>")
            tokens.append(text if added[i].normalized or special else tok.decode(tok.encode(text)))
            types.append(CONTROL if special else USER_DEFINED)
        else:
            tokens.append(text)
            types.append(BYTE if spm and re.fullmatch(r"<0x[0-9A-F]{2}>", text) else NORMAL)
    return tokens, types


def _spm_prefix(spec: dict[str, Any]) -> bool | None:
    """For a SentencePiece-style tokenizer (BPE with byte fallback, spaces as ▁): whether it prepends ▁ to each
    stretch of text, as llama.cpp's add_space_prefix does at the start and after every special token. None for
    other tokenizers; refused where llama.cpp's SPM tokenizer would split differently."""
    model, norm, pre = spec.get("model") or {}, spec.get("normalizer"), spec.get("pre_tokenizer")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return None
    steps = [(n.get("type"), n.get("prepend"), (n.get("pattern") or {}).get("String"), n.get("content"))
             for n in ((norm or {}).get("normalizers") or ([norm] if norm else []))]  # fmt: skip
    replace = ("Replace", None, " ", SPACE)
    if pre is None and steps in ([("Prepend", SPACE, None, None), replace], [replace]):
        return len(steps) == 2
    metaspace = pre is not None and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE
    if norm is None and metaspace and not pre.get("split", True) and pre.get("prepend_scheme") in ("always", "never"):
        return pre["prepend_scheme"] == "always"
    scheme = f" prepend_scheme {pre.get('prepend_scheme')!r}" if metaspace else ""
    raise UserError(
        f"tokenizer: a byte-fallback BPE with normalizer {_describe(norm)} and pre-tokenizer {_describe(pre)}"
        f"{scheme} has no faithful llama.cpp form (its SPM tokenizer replaces each space by ▁ and prepends one "
        "at the start and after every special token, or never)"
    )


def _spm_scores(spec: dict[str, Any], tokens: list[str], types: list[int]) -> list[float]:
    """Scores under which llama.cpp's SPM tokenizer (merge the adjacent pair whose union scores best, leftmost
    first) merges as this BPE does: a token scores minus the rank of its first merge. That holds only where the
    merges are all the splits of each token into two tokens, side by side, as SentencePiece-converted
    tokenizers have them; otherwise SPM would join pieces the BPE keeps apart, so that is refused."""
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"].get("merges") or []]
    ranks: dict[str, list[int]] = {}
    for rank, (a, b) in enumerate(merges):
        ranks.setdefault(a + b, []).append(rank)
    vocab = set(spec["model"]["vocab"])
    for text, kind in zip(tokens, types, strict=True):
        if kind != NORMAL:
            continue
        splits = {(text[:k], text[k:]) for k in range(1, len(text)) if text[:k] in vocab and text[k:] in vocab}
        found = ranks.get(text, [])
        mine = {merges[r] for r in found}
        if splits - mine or (found and found != list(range(found[0], found[0] + len(found)))):
            a, b = sorted(splits - mine)[0] if splits - mine else merges[found[0]]
            raise UserError(
                f"tokenizer: its merges are not SentencePiece's (token {text!r} = {a!r} + {b!r}), so llama.cpp's "
                "SPM tokenizer would join pieces this BPE keeps apart; there is no faithful GGUF form"
            )
    return [-float(ranks[t][0]) if t in ranks else (0.0 if k != NORMAL else -float(len(merges) + i))
            for i, (t, k) in enumerate(zip(tokens, types, strict=True))]  # fmt: skip


def _merges(spec: dict[str, Any]) -> list[str]:
    merges = spec["model"].get("merges") or []
    # tokenizers >= 0.20 stores pairs, which may hold spaces; llama.cpp reads "a b" with spaces as U+0120
    return [m if isinstance(m, str) else " ".join(p.replace(" ", "\u0120") for p in m) for m in merges]


def _special_ids(tok: Tokenizer, spec: dict[str, Any], folder: Path) -> tuple[int | None, int | None, bool]:
    """(bos id, pad id, add bos?) from the tokenizer's post-processor and the tokenizer_config.json a checkpoint
    imported from Hugging Face keeps, as gguf.SpecialVocab reads them; no bos at all means bos = eos."""
    post = spec.get("post_processor") or {}
    first = None
    for p in post.get("processors", [post]):
        single = p.get("single") or [] if p.get("type") == "TemplateProcessing" else []
        first = first or (single[0].get("SpecialToken", {}).get("id") if len(single) > 1 else None)
    config_file = folder / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    add_bos = config.get("add_bos_token") if isinstance(config.get("add_bos_token"), bool) else first is not None
    pad = config.get("pad_token")
    pad = pad.get("content") if isinstance(pad, dict) else pad
    bos = tok.bos_token or first
    bos_id = tok.hf.token_to_id(bos) if bos else tok.eos_id
    return bos_id, tok.hf.token_to_id(pad) if isinstance(pad, str) else None, add_bos


def _add_vocab(writer: gguf.GGUFWriter, tok: Tokenizer, n_vocab: int, folder: Path) -> None:
    spec = json.loads(tok.hf.to_str())  # tokenizer.json as a dict: model, merges, pre-tokenizer, post-processor
    prefix = _spm_prefix(spec)
    tokens, types = _tokens(tok, n_vocab, spm=prefix is not None, unk=spec["model"].get("unk_token"))
    if prefix is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer(tok, spec))
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)  # in the converter's order: tokens, scores, types, merges
    if prefix is not None:
        writer.add_token_scores(_spm_scores(spec, tokens, types))
    writer.add_token_types(types)
    if prefix is None:
        writer.add_token_merges(_merges(spec))
    else:
        writer.add_add_space_prefix(prefix)
    bos, pad, add_bos = _special_ids(tok, spec, folder)
    if bos is not None:
        writer.add_bos_token_id(bos)
    if tok.eos_id is not None:
        writer.add_eos_token_id(tok.eos_id)
    if UNKNOWN in types:
        writer.add_unk_token_id(types.index(UNKNOWN))
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(add_bos)
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


# ---- LoRA adapters ----


def _adapter_pairs(src: Checkpoint | str | Path) -> tuple[ModelConfig, float, dict[str, tuple[torch.Tensor, ...]]]:
    """(base model config, lora_alpha, {our module name: (A, B)}) from a model holding LoRA layers, or from a
    checkpoint folder that keeps a PEFT adapter beside its config.toml."""
    if isinstance(src, Checkpoint):
        layers = lora_layers(src.model)
        if not layers:
            raise UserError("the model holds no LoRA layers: there is no adapter to export")
        alpha = next(iter(layers.values())).alpha
        return src.cfg.model, alpha, {n: (m.lora_A.detach().cpu(), m.lora_B.detach().cpu()) for n, m in layers.items()}
    folder = Path(src)
    config = read_adapter_config(folder)
    if not (folder / "config.toml").is_file():
        raise UserError(f"{folder}: no config.toml beside the adapter, so its base model's shape is unknown")
    cfg = from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml")).model
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        module, _, kind = key.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
        pairs.setdefault(module.removeprefix("model."), {})[kind] = t
    if any(set(p) != {"lora_A", "lora_B"} for p in pairs.values()):
        raise UserError(f"{folder / ADAPTER_WEIGHTS}: every module needs one lora_A and one lora_B tensor")
    return cfg, float(config["lora_alpha"]), {n: (p["lora_A"], p["lora_B"]) for n, p in pairs.items()}


def adapter_to_gguf(ckpt_or_folder: Checkpoint | str | Path, out: str | Path) -> Path:
    """A LoRA adapter in llama.cpp's adapter GGUF (convert_lora_to_gguf.py's), to load with `--lora` over the
    base model's GGUF. LLaMA, Mistral, Qwen2 and Qwen3 only: GPT-2 and NeoX fuse q, k and v into one tensor."""
    cfg, alpha, pairs = _adapter_pairs(ckpt_or_folder)
    arch = architecture_of(cfg)
    if GGUF_ARCH[arch] not in (gguf.MODEL_ARCH.LLAMA, gguf.MODEL_ARCH.QWEN2, gguf.MODEL_ARCH.QWEN3):
        raise UserError(f"LoRA adapters export to GGUF for LLaMA, Mistral, Qwen2 and Qwen3 only, not {arch}")
    if "lm_head" in pairs and cfg.tie_embeddings:
        raise UserError("the adapter changes lm_head, which this model ties to its embedding; llama.cpp cannot")
    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], cfg.n_layer)
    writer = gguf.GGUFWriter(None, gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, (a, b) in pairs.items():
        hf_name = f"{module}.weight" if module == "lm_head" else f"model.{module}.weight"
        new = names.get_name(hf_name, try_suffixes=(".weight",))
        if new is None:
            raise UserError(f"adapter module {module} has no GGUF name in llama.cpp's {arch} map")
        b = _as_llamacpp(arch, cfg, hf_name, b)  # B's rows are the weight's rows: q and k permute alike
        writer.add_tensor(f"{new}.lora_a", a.float().contiguous().numpy())
        writer.add_tensor(f"{new}.lora_b", b.float().contiguous().numpy())
    return _write(writer, Path(out))
