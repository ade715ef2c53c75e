"""NF4: dequantization error within its known bound, codes that round-trip, and a frozen 4-bit linear layer
whose forward and backward equal those of its dequantized weight."""

from __future__ import annotations

import torch
from torch import nn

from nomoat.quant import (
    MAX_HALF_GAP,
    NF4_LEVELS,
    NF4Linear,
    dequantize_model,
    dequantize_nf4,
    nf4_error_bound,
    quantize_model,
    quantize_nf4,
)


def test_levels_round_trip_exactly() -> None:
    w = (NF4_LEVELS.repeat(8) * 0.37).reshape(2, 64)  # every block holds -1 and 1, so absmax is exact
    q = quantize_nf4(w, double_quant=False)
    assert torch.equal(dequantize_nf4(q), w)


def test_dequantization_error_within_bound() -> None:
    torch.manual_seed(0)
    w = torch.randn(384, 256) * torch.logspace(-3, 0, 256)  # blocks of very different scales
    for double in (False, True):
        q = quantize_nf4(w, double_quant=double)
        err = (dequantize_nf4(q) - w).abs()
        bound = nf4_error_bound(q, w)
        assert (err <= bound + 1e-6).all()
        assert (err / bound).max() > 0.9  # the bound is tight: some weight sits near the middle of the widest gap
    blocks = w.reshape(-1, 64).abs().amax(1, keepdim=True)  # single quantization: half a gap of the block's absmax
    err = (dequantize_nf4(quantize_nf4(w, double_quant=False)) - w).abs().reshape(-1, 64)
    assert (err <= blocks * MAX_HALF_GAP * (1 + 1e-5)).all()
    q = quantize_nf4(w, double_quant=True)
    assert q.nbytes() < w.numel() * 4 / 7.5  # 4 bits per weight plus ~0.127 for the absmax


def test_nf4_linear_forward_and_backward() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = NF4Linear(linear)
    dense = nn.Linear(128, 64)
    dense.weight.data, dense.bias.data = layer.dequantize(torch.float32), linear.bias.detach().clone()
    x = torch.randn(3, 5, 128, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(layer(x), dense(x2))
    layer(x).square().sum().backward()
    dense(x2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_quantize_model_is_reversible_to_the_dequantized_weights() -> None:
    from nomoat.config import ModelConfig
    from nomoat.model import Transformer

    cfg = ModelConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=32,
                      norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    x = torch.randint(0, 96, (2, 16))
    want = model(x)
    assert quantize_model(model) == 14
    got = model(x)
    assert 0 < (got - want).abs().max() < 0.1 * want.abs().max()
    dequantize_model(model)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    torch.testing.assert_close(model(x), got)
