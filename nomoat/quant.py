"""4-bit NormalFloat (NF4) weights, as QLoRA stores a frozen base model (arXiv:2305.14314), in plain torch.

Blockwise: each block of 64 weights keeps its absolute maximum, and each weight the nearest of 16 levels spaced
as quantiles of a normal distribution. Double quantization stores those absmax values in 8 bits too, per block
of 256 around their mean. `NF4Linear` is a frozen nn.Linear replacement that dequantizes on the fly and again
in backward, so no full-precision copy of the weight outlives a layer's call. Not here: LoRA (lora.py).
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
