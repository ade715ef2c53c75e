"""4-bit NormalFloat (NF4) weights, as QLoRA stores a frozen base model (arXiv:2305.14314), in plain torch.

Blockwise: each block of 64 weights keeps its absolute maximum, and each weight the nearest of 16 levels spaced
as quantiles of a normal distribution. Double quantization stores those absmax values in 8 bits too, per block
of 256 around their mean. `NF4Linear` is a frozen nn.Linear replacement that dequantizes on the fly and again
in backward, so no full-precision copy of the weight outlives a layer's call.

Weight-only int8 and int4 for inference (`--quantize`), through PyTorch's own CPU kernels: int8 with one scale
per output row (`_weight_int8pack_mm`), int4 with a scale and offset per group of 32 inputs, as llama.cpp's Q4
types group them (`_weight_int4pack_mm_for_cpu`). Both kernels are fast only with bf16 activations (with fp32
they run 10-20x slower here), so a product casts its input to bf16 and its output back. They are built for few
rows (a decode step); a prefill of 128 tokens runs about 2x slower than fp32's matmul, but every row is computed
alike whatever the batch, so a served answer does not depend on who else is in it. The
token table and output head are int8 in both modes (the head is the largest single read of a decode step).
Not here: LoRA (lora.py).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.errors import UserError
from nomoat.model import rope_tables

# The 16 NF4 levels, normalised to [-1, 1] (QLoRA, appendix E; bitsandbytes' table).
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
)  # fmt: skip
BLOCK = 64
ABSMAX_BLOCK = 256
# The largest gap between neighbouring levels: rounding to the nearest moves a normalised weight at most half of it.
MAX_HALF_GAP = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)


@dataclass
class NF4Tensor:
    """A quantized weight: packed 4-bit codes (two per byte), absmax per block (fp32, or 8-bit codes with a
    scale per ABSMAX_BLOCK blocks and their mean when double-quantized), and the original shape and dtype."""

    codes: torch.Tensor  # uint8 (numel / 2,)
    absmax: torch.Tensor  # float32 (n_blocks,) or uint8 (n_blocks,) when double-quantized
    absmax_scale: torch.Tensor | None  # float32 (ceil(n_blocks / ABSMAX_BLOCK),)
    absmax_mean: torch.Tensor | None  # float32 ()
    shape: torch.Size
    dtype: torch.dtype

    def nbytes(self) -> int:
        parts = (self.codes, self.absmax, self.absmax_scale, self.absmax_mean)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> NF4Tensor:
    """NF4 codes of a weight whose size is a multiple of 64 (true of every matrix in the supported models)."""
    if weight.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} weights, got {weight.numel()}")
    blocks = weight.detach().float().reshape(-1, BLOCK)  # (n_blocks, 64)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    levels = NF4_LEVELS.to(weight.device)
    # Nearest level by bucketing against the midpoints, without a (numel, 16) distance table.
    codes = torch.bucketize(blocks / absmax[:, None], (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    packed = codes[0::2] << 4 | codes[1::2]
    scale = mean = None
    if double_quant:  # QLoRA section 3: 8-bit absmax per block of 256, symmetric around the mean
        mean = absmax.mean()
        centred = absmax - mean
        pad = -len(centred) % ABSMAX_BLOCK
        groups = F.pad(centred, (0, pad)).reshape(-1, ABSMAX_BLOCK)
        scale = groups.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
        q = torch.round(groups / scale[:, None]).clamp(-127, 127).flatten()[: len(absmax)]
        absmax = (q + 128).to(torch.uint8)
    return NF4Tensor(packed, absmax, scale, mean, weight.shape, weight.dtype)


def block_absmax(q: NF4Tensor) -> torch.Tensor:
    """The fp32 absmax of every block, decoded from 8 bits when double-quantized."""
    if q.absmax_scale is None:
        return q.absmax
    assert q.absmax_mean is not None
    scale = q.absmax_scale.repeat_interleave(ABSMAX_BLOCK)[: len(q.absmax)]
    return (q.absmax.float() - 128) * scale + q.absmax_mean


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    codes = torch.stack([q.codes >> 4, q.codes & 15], dim=1).flatten().long()  # (numel,)
    values = NF4_LEVELS.to(q.codes.device)[codes].reshape(-1, BLOCK) * block_absmax(q)[:, None]
    return values.reshape(q.shape).to(dtype or q.dtype)


def nf4_error_bound(q: NF4Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-weight bound on |w - dequantize(quantize(w))|: half the widest level gap times the block's absmax,
    plus the error of the stored absmax itself (a weight's normalised value is at most 1)."""
    true_absmax = weight.detach().float().reshape(-1, BLOCK).abs().amax(dim=1)
    stored = block_absmax(q)
    bound = true_absmax * MAX_HALF_GAP + (stored - true_absmax).abs() * (1 + MAX_HALF_GAP)
    return bound[:, None].expand(-1, BLOCK).reshape(q.shape)


class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized in forward and again in backward, never saved: that is the memory saving."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad @ ctx.layer.dequantize(grad.dtype), None


class NF4Linear(nn.Module):
    """A frozen linear layer with 4-bit NF4 weights; the bias (if any) stays in full precision, also frozen."""

    def __init__(self, linear: nn.Linear, double_quant: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q = quantize_nf4(linear.weight, double_quant)
        self.shape, self.dtype = q.shape, q.dtype
        self.register_buffer("codes", q.codes)
        self.register_buffer("absmax", q.absmax)
        self.register_buffer("absmax_scale", q.absmax_scale)
        self.register_buffer("absmax_mean", q.absmax_mean)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def quantized(self) -> NF4Tensor:
        return NF4Tensor(self.codes, self.absmax, self.absmax_scale, self.absmax_mean, self.shape, self.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self.quantized(), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4"


def quantize_model(model: nn.Module, double_quant: bool = True) -> int:
    """Replace every nn.Linear inside the transformer blocks with an NF4Linear, in place; returns how many.
    Embeddings, norms and the output head stay in full precision, as in QLoRA."""
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")]
    for name, linear in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NF4Linear(linear, double_quant))
    return len(swaps)


def dequantize_model(model: nn.Module) -> None:
    """Replace every NF4Linear with an nn.Linear holding its dequantized weights (fp32), in place."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, NF4Linear)]:
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device=m.codes.device)
        linear.weight.data = m.dequantize(torch.float32)
        if m.bias is not None:
            linear.bias.data = m.bias.detach().float()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)


# ---- weight-only int8 / int4 for inference ----

GROUP = 32  # int4: inputs per scale and offset


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.size(-1))


def quantize_int8(weight: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows and their fp32 scales (symmetric, absmax / 127), made `rows` at a time so that the fp32
    temporaries of a large token table stay small."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0])
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].detach().float()
        s = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
        q[start : start + rows], scales[start : start + rows] = torch.round(w / s[:, None]).clamp(-127, 127), s
    return q, scales


@dataclass
class Int4Weight:
    """int4 weights in a form any machine reads (checkpoints, GGUF's Q4_0): one code in 0..15 a byte, (n, k), and
    per group of GROUP inputs a scale and an offset, (n, k / GROUP), for value = (code - 8) * scale + offset,
    the convention of `_weight_int4pack_mm_for_cpu`. Int4Linear packs it in the kernel's own layout."""

    codes: torch.Tensor  # uint8 (n, k)
    scales: torch.Tensor  # (n, k / GROUP)
    offsets: torch.Tensor  # (n, k / GROUP)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        groups = self.codes.float().reshape(n, -1, GROUP) - 8  # (n, k / GROUP, GROUP)
        return (groups * self.scales.float()[..., None] + self.offsets.float()[..., None]).reshape(n, k)

    @staticmethod
    def cat(parts: list[Int4Weight]) -> Int4Weight:
        """The parts' rows in turn, as model.fuse joins projections."""
        return Int4Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scales", "offsets")))


def quantize_int4(weight: torch.Tensor) -> Int4Weight:
    """Min-max int4 codes of a weight: each group's lowest value is code 0 and its highest code 15."""
    w = weight.detach().float()
    n, k = w.shape
    groups = w.reshape(n, k // GROUP, GROUP)
    low = groups.amin(-1)
    scale = ((groups.amax(-1) - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return Int4Weight(q, scale, low + 8 * scale)  # the offset is the value of code 8


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the int4 kernel takes a weight of this shape: inputs in groups of 32, outputs in 16s (its packing)."""
    return in_features % GROUP == 0 and out_features % 16 == 0


class Int8Linear(nn.Module):
    """A frozen nn.Linear as int8 weights with one bf16 scale per output row (symmetric, absmax / 127)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None = None) -> None:
        super().__init__()
        if scales is None:  # weight is float: quantize it; else it is int8 already, with its scales
            weight, scales = quantize_int8(weight)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x).to(torch.bfloat16)
        if rows.size(0) == 1 and torch.compiler.is_compiling() and self.weight_int8.size(0) >= 2 * rows.size(1):
            y = _int8_row_product(rows, self.weight_int8, self.scales)
        else:
            y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _int8_row_product(row: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """One bf16 row (1, k) times int8 weights (n, k) as a dequantize-multiply-sum, which Inductor compiles into one
    loop streaming the int8 weights: for wide matrices (gate/up, the output head) 1.3-2x as fast as
    `_weight_int8pack_mm` here (that kernel is built for many rows), for narrower ones slower, so only those at
    least twice as wide as deep come here. Rounded as the kernel rounds (fp32 sums, scaled, then bf16), so a
    compiled batch-1 step and an eager or batched one agree."""
    return ((row.float() * weight.float()).sum(-1) * scales.float()).to(torch.bfloat16)[None]


class Int4Linear(nn.Module):
    """A frozen nn.Linear as 4-bit weights, each group of GROUP inputs with its bf16 scale and offset (min-max,
    asymmetric), packed in the layout `_weight_int4pack_mm_for_cpu` reads. Made from an nn.Linear (quantized
    here), or from int4 weights already made (a checkpoint's, a GGUF file's Q4_0 blocks) and their bias."""

    def __init__(self, linear: nn.Linear | Int4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if isinstance(linear, nn.Linear):
            linear, bias = quantize_int4(linear.weight), linear.bias
        n, k = linear.shape
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(linear.codes.to(torch.int32), 1))
        # the kernel computes (q - 8) * scale + offset
        pairs = torch.stack([linear.scales.float(), linear.offsets.float()], -1).transpose(0, 1)  # (k / GROUP, n, 2)
        self.register_buffer("scales_and_zeros", pairs.contiguous().to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = k, n

    def unpack(self) -> Int4Weight:
        """The codes, scales and offsets back out of the kernel's packed layout (for a checkpoint), read through
        the kernel itself: with scale 1 and offset 8, an identity matrix times the weights gives the codes."""
        k, n = self.in_features, self.out_features
        ones = torch.stack([torch.ones(k // GROUP, n), torch.full((k // GROUP, n), 8.0)], -1).to(torch.bfloat16)
        eye = torch.eye(k, dtype=torch.bfloat16)
        codes = torch._weight_int4pack_mm_for_cpu(eye, self.packed, GROUP, ones).t().to(torch.uint8)  # (n, k)
        pairs = self.scales_and_zeros.transpose(0, 1)  # (n, k / GROUP, 2)
        return Int4Weight(codes.contiguous(), pairs[..., 0].contiguous(), pairs[..., 1].contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(_rows(x).to(torch.bfloat16), self.packed, GROUP, self.scales_and_zeros)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Embedding(nn.Module):
    """A token table as int8 rows with a scale each; its buffers also serve a tied output head (Int8Linear)."""

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.head = head  # owns weight_int8 and scales; registered here too, so a tied head is one copy

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.head.weight_int8).float()
        return rows * self.head.scales[idx].float()[..., None]


WEIGHT_BITS = ("int8", "int4")


@torch.no_grad()
def quantize_weights(model: nn.Module, bits: str) -> nn.Module:
    """The model (a Transformer, fused first) with every block projection in int8 or int4 and its token table
    and output head in int8, in place; each full-precision weight is let go as its replacement is made.
    Projections of a shape the int4 kernel does not take (int4_fits) stay int8 under int4."""
    _check_bits(bits)
    model.fuse()
    for _, owner, attr, child in list(_block_linears(model)):
        setattr(owner, attr, _quantized_linear(child.weight, child.bias, bits))
    tied = model.lm_head.weight is model.embed_tokens.weight
    head = Int8Linear(model.lm_head.weight, None)
    table = head if tied else Int8Linear(model.embed_tokens.weight, None)
    model.lm_head, model.embed_tokens = head, Int8Embedding(table)
    return model


def _check_bits(bits: str) -> None:
    if bits not in WEIGHT_BITS:
        raise ValueError(f"unknown weight quantization {bits!r} (choose from {', '.join(WEIGHT_BITS)})")


def _block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    """(name, owner, attribute, layer) for each plain nn.Linear of the blocks: ("layers.0.mlp.down_proj", ...)."""
    for i, block in enumerate(model.layers):
        for part in ("self_attn", "mlp"):
            owner = getattr(block, part)
            for attr, child in list(owner.named_children()):
                if type(child) is nn.Linear:
                    yield f"layers.{i}.{part}.{attr}", owner, attr, child


def _quantized_linear(weight: torch.Tensor | Int4Weight, bias: torch.Tensor | None, bits: str) -> nn.Module:
    """int4 where the kernel takes the shape (int4 weights made already are used as they are), else int8."""
    if bits == "int4" and int4_fits(*weight.shape):
        return Int4Linear(weight if isinstance(weight, Int4Weight) else quantize_int4(weight), bias)
    return Int8Linear(_float(weight), bias)


def _float(t: torch.Tensor | Int4Weight) -> torch.Tensor:
    return t.dequantize() if isinstance(t, Int4Weight) else t.float()


# model.fuse's joined projections and the ones they join, in order
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _parts(name: str) -> list[str]:
    owner, _, attr = name.rpartition(".")
    return [f"{owner}.{part}" for part in FUSED.get(attr, (attr,))]


@torch.no_grad()
def quantize_streamed(
    model: nn.Module, groups: Iterable[dict[str, torch.Tensor | Int4Weight]], bits: str, where: str = "model"
) -> nn.Module:
    """quantize_weights for a model whose weights are not in memory: `model` is a skeleton on the meta device
    (load_model(..., device="meta")) and `groups` its tensors by name a layer at a time (Checkpoint.weights),
    a block projection's perhaps as int4 weights made already (a GGUF file's Q4_0). Each layer is quantized as it
    arrives, so that only one layer's full-precision weights exist at a time; the result is quantize_weights'."""
    _check_bits(bits)
    model.fuse()  # on the meta device only the structure changes
    linears = {name: (owner, attr, child) for name, owner, attr, child in _block_linears(model)}
    for group in groups:
        group = dict(group)
        for name in [n for n in linears if f"{_parts(n)[0]}.weight" in group]:
            owner, attr, child = linears.pop(name)
            setattr(owner, attr, _joined_linear(group, name, child, bits, where))
        if model.cfg.tie_embeddings:
            group.pop("lm_head.weight", None)
        if "lm_head.weight" in group:
            model.lm_head = Int8Linear(_float(group.pop("lm_head.weight")), None)
        if "embed_tokens.weight" in group:
            model.embed_tokens = Int8Embedding(Int8Linear(_float(group.pop("embed_tokens.weight")), None))
            if model.cfg.tie_embeddings:
                model.lm_head = model.embed_tokens.head
        _assign(model, {k: _float(v) for k, v in group.items()}, where)
        _trim_heap()
    return _checked(model, where)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def _trim_heap() -> None:
    """Hand the memory freed by a layer back to the system. glibc keeps freed blocks for reuse, and the int8/int4
    layers made in between pin its heap, so that without this the peak RSS of a streamed 135M-parameter load
    varied from run to run between 0.5 and 1 GB (about 0.48 GB with it)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


def _joined_linear(group: dict, name: str, child: nn.Linear, bits: str, where: str) -> nn.Module:
    """The layer `name` quantized from its parts' tensors in `group` (taken out of it), joined as model.fuse does."""
    weights = [group.pop(f"{part}.weight") for part in _parts(name)]
    if all(isinstance(w, Int4Weight) for w in weights):
        weight: torch.Tensor | Int4Weight = Int4Weight.cat(weights)
    else:
        weight = torch.cat([_float(w) for w in weights])
    if tuple(weight.shape) != tuple(child.weight.shape):
        want = tuple(child.weight.shape)
        raise UserError(f"{where}: {name} has shape {tuple(weight.shape)}, the config wants {want}")
    bias = None
    if child.bias is not None:
        bias = torch.cat([_float(group.pop(f"{part}.bias")) for part in _parts(name)])
    return _quantized_linear(weight, bias, bits)


def _assign(model: nn.Module, rest: dict[str, torch.Tensor], where: str) -> None:
    """The other tensors (norms, positions) into the model, as copies of our own: a tensor read from a file can
    keep the file's whole memory map, and with it every page read so far, alive."""
    rest = {k: v.clone(memory_format=torch.contiguous_format) for k, v in rest.items()}
    unexpected = model.load_state_dict(rest, strict=False, assign=True).unexpected_keys
    if unexpected:
        raise UserError(f"{where}: unexpected tensor {unexpected[0]} for this config")


def _checked(model: nn.Module, where: str) -> nn.Module:
    missing = [name for name, t in model.state_dict().items() if t.is_meta]
    if missing:
        raise UserError(f"{where}: missing tensor {missing[0]}")
    if model.cfg.pos_emb == "rope" and model.rope_cos.is_meta:  # tables that are not saved: made again
        model.rope_cos, model.rope_sin = rope_tables(model.cfg, model.cfg.max_seq_len)
    return model.eval()


# ---- int8 / int4 models as checkpoints store them ----


def quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A quantize_weights model's tensors in the portable form a checkpoint stores: an Int8Linear as its int8
    rows (`weight_int8`) and bf16 `scales`; an Int4Linear as `codes`, two to a byte with the even input in the low
    nibble, and bf16 `scales` and `offsets` (Int4Weight); the token table (and an untied head) as int8 rows under
    embed_tokens (lm_head); block projections under their fused names (qkv_proj, gate_up_proj); the rest as is."""
    if not isinstance(model.embed_tokens, Int8Embedding):
        raise ValueError("not a quantized model: quantize_weights it first")
    table = model.embed_tokens.head
    layers = [("embed_tokens", table)] + ([("lm_head", model.lm_head)] if model.lm_head is not table else [])
    blocks = model.layers.named_modules(prefix="layers")
    layers += [(n, m) for n, m in blocks if isinstance(m, Int8Linear | Int4Linear)]
    state: dict[str, torch.Tensor] = {}
    for name, m in layers:
        if isinstance(m, Int4Linear):
            q = m.unpack()
            state |= {f"{name}.codes": q.codes[:, 0::2] | q.codes[:, 1::2] << 4, f"{name}.scales": q.scales}
            state[f"{name}.offsets"] = q.offsets
        else:
            state |= {f"{name}.weight_int8": m.weight_int8, f"{name}.scales": m.scales}
        if m.bias is not None:
            state[f"{name}.bias"] = m.bias
    owners = {n for n, _ in layers}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in owners and not key.startswith(("embed_tokens.", "lm_head.")):
            state[key] = t  # norms, learned positions
    return {k: v.detach().contiguous() for k, v in state.items()}


@torch.no_grad()
def load_quantized_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """quantized_state's inverse: `model` is a skeleton on the meta device, filled with layers made from the
    stored codes as they are, so that nothing is quantized and no full-precision copy of a weight is made."""
    model.fuse()
    state = dict(state)
    for name, owner, attr, child in list(_block_linears(model)):
        setattr(owner, attr, _stored_linear(state, name, child.out_features, child.in_features, where))
    table = _stored_linear(state, "embed_tokens", *model.embed_tokens.weight.shape, where)
    if not model.cfg.tie_embeddings:
        model.lm_head = _stored_linear(state, "lm_head", *model.lm_head.weight.shape, where)
    else:
        model.lm_head = table
    model.embed_tokens = Int8Embedding(table)
    _assign(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, where)
    return _checked(model, where)


def _stored_linear(state: dict[str, torch.Tensor], name: str, n: int, k: int, where: str) -> nn.Module:
    def take(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = state.pop(f"{name}.{key}", None)
        if t is None:
            raise UserError(f"{where}: missing tensor {name}.{key}")
        if tuple(t.shape) != shape or t.dtype != dtype:
            got, want = f"{tuple(t.shape)} {t.dtype}", f"{shape} {dtype}"
            raise UserError(f"{where}: tensor {name}.{key} is {got}, the config wants {want}")
        # a copy of our own: safetensors may hand out memory at any offset, and the kernels crash on misaligned rows
        return t.clone(memory_format=torch.contiguous_format)

    bias = take("bias", (n,), torch.float32) if f"{name}.bias" in state else None
    if f"{name}.codes" not in state:
        return Int8Linear(take("weight_int8", (n, k), torch.int8), bias, take("scales", (n,), torch.bfloat16))
    if not int4_fits(n, k):
        raise UserError(f"{where}: {name} is int4, which the kernel cannot hold at shape {(n, k)}")
    packed = take("codes", (n, k // 2), torch.uint8)
    codes = torch.stack([packed & 15, packed >> 4], -1).reshape(n, k)
    groups = (n, k // GROUP)
    scales, offsets = take("scales", groups, torch.bfloat16), take("offsets", groups, torch.bfloat16)
    return Int4Linear(Int4Weight(codes, scales, offsets), bias)
