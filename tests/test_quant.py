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


# ---- weight-only int8 / int4 for inference ----


def _tiny(**switches):
    from nomoat.config import ModelConfig
    from nomoat.model import Transformer

    cfg = ModelConfig(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64,
                      **switches)  # fmt: skip
    torch.manual_seed(0)
    return Transformer(cfg).eval()


LLAMA = {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False, "init": "normal"}


def test_int8_and_int4_linear_against_their_dequantized_weights() -> None:
    """Each layer computes x @ W'^T for its own dequantized W' (up to bf16 activations), and W' is as close to W
    as the format allows: int8 per row, int4 per group of 32 (min-max)."""
    from nomoat.quant import GROUP, Int4Linear, Int8Linear

    torch.manual_seed(0)
    lin = nn.Linear(96, 80)
    w, x = lin.weight.detach(), torch.randn(5, 96)
    q8 = Int8Linear(lin.weight, lin.bias)
    w8 = q8.weight_int8.float() * q8.scales.float()[:, None]
    g = w.reshape(80, -1, GROUP)
    low, step = g.amin(-1, keepdim=True), (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15
    w4 = (torch.round((g - low) / step).clamp(0, 15) * step + low).reshape(80, 96)
    for q, wq, weight_err in ((q8, w8, 0.01), (Int4Linear(lin), w4, 0.1)):
        ref = x @ wq.t() + lin.bias.detach()
        assert ((q(x) - ref).norm() / ref.norm()) < 0.01
        assert ((wq - w).norm() / w.norm()) < weight_err
        assert q(x[None]).shape == (1, 5, 80)


def test_int8_row_product_is_the_kernel_bit_for_bit() -> None:
    """The compiled one-row int8 product (a dequantize-multiply-sum for Inductor) rounds as the packed kernel does,
    so a batch-1 compiled step and a batched one give the same numbers."""
    from nomoat.quant import Int8Linear, _int8_row_product

    torch.manual_seed(0)
    q8 = Int8Linear(torch.randn(300, 576) * 0.02, None)
    x = torch.randn(1, 576).to(torch.bfloat16)
    kernel = torch._weight_int8pack_mm(x, q8.weight_int8, q8.scales)
    assert torch.equal(_int8_row_product(x, q8.weight_int8, q8.scales), kernel)
    assert torch.equal(torch.compile(_int8_row_product)(x, q8.weight_int8, q8.scales), kernel)


def test_quantized_model_is_close_small_and_decodes_alike_in_every_path() -> None:
    """Logits near fp32's; int8 weights take at most 0.35x fp32's bytes and int4 0.22x (token table and head
    int8, shared when tied); the compiled step and a batch give the eager one-row tokens."""
    from nomoat.generate import generate_tokens
    from nomoat.model import KVCache
    from nomoat.quant import Int8Embedding, quantize_weights

    idx = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    for bits, tol, size in (("int8", 0.03, 0.35), ("int4", 0.25, 0.22)):
        model = _tiny(**LLAMA)
        fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
        with torch.no_grad():
            ref = model(idx)
            quantize_weights(model, bits)
            out = model(idx)
        assert ((out - ref).norm() / ref.norm()) < tol, bits
        assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.head is model.lm_head
        stored = {t.data_ptr(): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}
        rope = sum(t.numel() * t.element_size() for t in (model.rope_cos, model.rope_sin))
        assert (sum(stored.values()) - rope) / fp32_bytes <= size, bits
        eager = list(generate_tokens(model, [3, 4, 5], 12, temperature=0, compile=False))
        assert list(generate_tokens(model, [3, 4, 5], 12, temperature=0, compile=True)) == eager
        with torch.no_grad():  # the same prompt in a batch of three rows: the same next-token logits
            cache = KVCache(model.cfg, 3, 8)
            batch = model(torch.tensor([[3, 4, 5]] * 3), cache=cache)[:, -1]
            torch.testing.assert_close(batch, model(torch.tensor([[3, 4, 5]]))[:, -1].expand(3, -1))


def test_untied_gpt2_quantizes_too() -> None:
    from nomoat.quant import quantize_weights

    model = _tiny(tie_embeddings=False)
    idx = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        ref = model(idx)
        out = quantize_weights(model, "int8")(idx)
    assert ((out - ref).norm() / ref.norm()) < 0.03
    assert model.embed_tokens.head is not model.lm_head
