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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


class Int8Linear(nn.Module):
    """A frozen nn.Linear as int8 weights with one bf16 scale per output row (symmetric, absmax / 127)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor | None = None) -> None:
        super().__init__()
        if scales is None:  # weight is float: quantize it; else it is int8 already, with its scales
            w = weight.detach().float()
            scales = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
            weight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_int8", weight)
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int8pack_mm(_rows(x).to(torch.bfloat16), self.weight_int8, self.scales)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int4Linear(nn.Module):
    """A frozen nn.Linear as 4-bit weights, each group of GROUP inputs with its bf16 scale and offset (min-max,
    asymmetric), packed in the layout `_weight_int4pack_mm_for_cpu` reads."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        n, k = w.shape
        groups = w.reshape(n, k // GROUP, GROUP)
        low = groups.amin(-1)
        scale = ((groups.amax(-1) - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        # the kernel computes (q - 8) * scale + offset: the offset is the value of code 8
        pairs = torch.stack([scale, low + 8 * scale], -1).transpose(0, 1)  # (k / GROUP, n, 2)
        self.register_buffer("scales_and_zeros", pairs.contiguous().to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = k, n

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
    Projections whose inputs do not split into groups of 32 stay int8 under int4."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"unknown weight quantization {bits!r} (choose from {', '.join(WEIGHT_BITS)})")
    model.fuse()
    for block in model.layers:
        for owner in (block.self_attn, block.mlp):
            for name, child in list(owner.named_children()):
                if type(child) is nn.Linear:
                    use4 = bits == "int4" and child.in_features % GROUP == 0
                    setattr(owner, name, Int4Linear(child) if use4 else Int8Linear(child.weight, child.bias))
    tied = model.lm_head.weight is model.embed_tokens.weight
    head = Int8Linear(model.lm_head.weight, None)
    table = head if tied else Int8Linear(model.embed_tokens.weight, None)
    model.lm_head, model.embed_tokens = head, Int8Embedding(table)
    return model
