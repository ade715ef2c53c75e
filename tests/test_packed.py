"""oneDNN-packed fp32 layers: the products of the weights they replace, eager and compiled, for any batch; a whole
model packed gives its logits; a layer's packed weight is freed with it."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from nomoat import packed
from nomoat.config import ModelConfig
from nomoat.model import Transformer

pytestmark = pytest.mark.skipif(not packed.available(), reason="this PyTorch build has no oneDNN")


@torch.no_grad()
def test_packed_linear_equals_linear_eager_and_compiled() -> None:
    torch.manual_seed(0)
    for bias in (False, True):
        lin = nn.Linear(96, 200, bias=bias)
        layer = packed.PackedLinear(lin)
        compiled = torch.compile(layer, dynamic=False)
        for shape in ((1, 96), (3, 1, 96), (2, 17, 96)):
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_packed_model_keeps_its_logits_and_its_token_table() -> None:
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 97, (2, 12))
    before = model(idx)
    assert packed.pack_linears(model.fuse()) == 2 * 4 + 1  # qkv, o, up and down per block, and the head
    assert not any(type(m) is nn.Linear for m in model.modules())
    torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
    assert model.embed_tokens.weight.shape == (97, 32)  # the tied table stays, for lookups


def test_packed_weight_is_released_with_its_layer() -> None:
    layer = packed.PackedLinear(nn.Linear(32, 64))
    handle = int(layer.handle)
    assert handle in packed._PACKED
    del layer
    gc.collect()
    assert handle not in packed._PACKED
