"""Model: causality, KV-cache decoding equals a full forward pass, SDPA equals plain attention, sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

import nomoat.model as model_module
from nomoat.config import ModelConfig
from nomoat.model import KVCache, Transformer

TINY = {"vocab_size": 97, "n_layer": 2, "n_head": 4, "d_model": 32, "d_ff": 64, "max_seq_len": 32}
ARCHS = {
    "gpt2": ModelConfig(**TINY),
    "neox": ModelConfig(
        **TINY, mlp="gelu", pos_emb="rope", rotary_pct=0.5, parallel_residual=True, tie_embeddings=False, init="neox"
    ),
    "llama-gqa": ModelConfig(
        **TINY,
        n_kv_head=2,
        norm="rmsnorm",
        mlp="swiglu",
        pos_emb="rope",
        rope_theta=500000.0,
        bias=False,
        tie_embeddings=False,
        init="normal",
    ),
    "qwen2": ModelConfig(
        **TINY, n_kv_head=1, norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qkv_bias=True, init="normal"
    ),
    "qwen3": ModelConfig(  # QK-norm, with a head_dim that is not d_model / n_head
        **TINY,
        n_kv_head=2,
        head_dim=16,
        norm="rmsnorm",
        mlp="swiglu",
        pos_emb="rope",
        bias=False,
        qk_norm=True,
        init="normal",
    ),
}


def build(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ARCHS[name]).eval()
    with torch.no_grad():  # biases start at zero, QK-norms at one; randomise them so the tests see a misplaced one
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
            elif n.endswith(("q_norm.weight", "k_norm.weight")):
                p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("name", ARCHS)
def test_causal(name):
    model = build(name)
    idx = torch.randint(0, 97, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (idx[:, 9] + 1) % 97
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("name", ARCHS)
def test_kv_cache_decoding_equals_full_forward(name):
    model = build(name)
    idx = torch.randint(0, 97, (2, 20))
    full = model(idx)
    cache = KVCache(model.cfg, batch_size=2, max_len=20)
    pieces = [model(idx[:, :7], cache=cache)]  # prefill
    pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(7, 12)]  # one token at a time
    pieces.append(model(idx[:, 12:], cache=cache))  # a chunk after a cached prefix
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)
    assert cache.pos == 20


def reference_attention(q, k, v, attn_mask=None, is_causal=False):
    """Textbook softmax(QK^T / sqrt(D)) V with an explicit mask."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    T, S = q.size(-2), k.size(-2)
    if is_causal:
        attn_mask = torch.ones(T, S, dtype=torch.bool).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("name", ARCHS)
def test_sdpa_equals_reference_attention(name, monkeypatch):
    model = build(name)
    idx = torch.randint(0, 97, (2, 16))
    fast = model(idx)
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", reference_attention)
    slow = model(idx)
    cache = KVCache(model.cfg, batch_size=2, max_len=16)
    slow_cached = torch.cat(
        [model(idx[:, :5], cache=cache), model(idx[:, 5:6], cache=cache), model(idx[:, 6:], cache=cache)], 1
    )
    monkeypatch.undo()
    assert F.scaled_dot_product_attention is not reference_attention
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast, slow_cached, rtol=1e-4, atol=1e-5)


def test_tied_embeddings_share_storage():
    model = build("gpt2")
    assert model.lm_head.weight is model.embed_tokens.weight
    assert build("neox").lm_head.weight is not build("neox").embed_tokens.weight


def test_parameter_count_and_flops():
    cfg = ARCHS["gpt2"]
    model = Transformer(cfg)
    C, L, F_, V, T = cfg.d_model, cfg.n_layer, cfg.d_ff, cfg.vocab_size, cfg.max_seq_len
    per_layer = 4 * C * C + 4 * C + 2 * C * F_ + F_ + C + 4 * C  # attention, MLP, two LayerNorms
    assert model.num_params() == V * C + T * C + L * per_layer + 2 * C
    assert model.num_params(non_embedding=True) == model.num_params() - T * C
    assert model.flops_per_token(16) == 6 * model.num_params(non_embedding=True) + 12 * L * C * 16


def test_init_follows_the_originals():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, n_layer=8, n_head=8, d_model=512, d_ff=2048, max_seq_len=64)
    model = Transformer(cfg)
    out_std = model.layers[0].self_attn.o_proj.weight.std().item()
    in_std = model.layers[0].self_attn.q_proj.weight.std().item()
    assert abs(in_std - 0.02) < 1e-3
    assert abs(out_std - 0.02 / math.sqrt(2 * 8)) < 5e-4  # GPT-2's scaled residual init
    assert model.layers[0].self_attn.q_proj.bias.abs().max() == 0


def test_too_long_input_is_refused():
    model = build("gpt2")
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "qwen3"])
def test_one_token_step_traces_once(name):
    """Positions live in a tensor and attention reads the whole cache under a mask, so decoding compiles once."""
    model = build(name)
    idx = torch.randint(0, 97, (1, 12))
    cache = KVCache(model.cfg, batch_size=1, max_len=12)
    torch._dynamo.reset()  # forget other tests' traces of Transformer.forward
    step = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)  # Dynamo only: cheap to trace
    pieces = [model(idx[:, :4], cache=cache)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        pieces += [step(idx[:, t : t + 1], cache) for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_packed_samples_compute_what_they_compute_alone(name):
    model = build(name)
    a, b, c = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 12))
    row = torch.cat([a, b, c], dim=1)  # (1, 24)
    segments = torch.tensor([[0] * 7 + [1] * 5 + [2] * 12])
    with torch.no_grad():
        packed = model(row, segments=segments)
        alone = torch.cat([model(a), model(b), model(c)], dim=1)
        leaky = model(row)  # without segments the later samples see the earlier ones
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(leaky[:, 7:], alone[:, 7:], atol=1e-3)


@pytest.mark.parametrize("name", ARCHS)
def test_fused_projections_compute_the_same(name):
    """fuse() joins q/k/v (and SwiGLU's gate/up) into one matrix each: same logits, same parameter count, and
    a LoRA-wrapped projection is left alone."""
    from nomoat.lora import add_lora

    model = build(name)
    idx = torch.randint(0, ARCHS[name].vocab_size, (2, 12))
    with torch.no_grad():
        before, n = model(idx), model.num_params()
        model.fuse()
        torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
    assert model.num_params() == n and model.layers[0].self_attn.qkv_proj is not None
    assert (model.layers[0].mlp.gate_up_proj is not None) == (ARCHS[name].mlp == "swiglu")
    lora = build(name)
    add_lora(lora, rank=2, alpha=4, targets=("q_proj",))
    assert lora.fuse().layers[0].self_attn.qkv_proj is None


@pytest.mark.parametrize("name", ARCHS)
def test_column_major_weights_compute_the_same(name):
    """transpose_weights() changes only strides: same logits and parameter count, every plain projection and the
    head column-major, and a tied table still the head's own tensor."""
    model = build(name)
    idx = torch.randint(0, ARCHS[name].vocab_size, (2, 12))
    with torch.no_grad():
        before, n = model(idx), model.num_params()
        model.fuse().transpose_weights()
        torch.testing.assert_close(model(idx), before, rtol=1e-5, atol=1e-5)
    assert model.num_params() == n
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.weight.t().is_contiguous() == (m.out_features >= m.in_features) for m in linears)
    assert (model.embed_tokens.weight is model.lm_head.weight) == ARCHS[name].tie_embeddings


def test_qk_norm_is_per_head_rmsnorm_initialised_to_one_and_generates_as_full_forward():
    """QK-norm adds one (D,) weight per q and k, reset to ones (like every norm), and greedy decoding through the
    KV cache picks what argmax over a full forward pass of the whole sequence picks."""
    from nomoat.generate import generate_tokens

    cfg = ARCHS["qwen3"]
    attn = Transformer(cfg).layers[0].self_attn
    assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (cfg.dim_head,)
    assert attn.q_norm.weight.eq(1).all() and attn.k_norm.weight.eq(1).all() and attn.q_norm.bias is None
    assert Transformer(ARCHS["llama-gqa"]).layers[0].self_attn.q_norm is None
    model = build("qwen3")
    assert sum("q_norm" in n or "k_norm" in n for n, _ in model.named_parameters()) == 2 * cfg.n_layer
    prompt = torch.randint(0, 97, (6,)).tolist()
    mine = list(generate_tokens(model, prompt, max_new_tokens=20, temperature=0, compile=False))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert mine == ids[len(prompt) :]


@pytest.mark.parametrize("parallel", [False, True])
def test_dropout_acts_in_training_only(parallel):
    """model.dropout zeroes part of each block's attention and MLP output while training; eval and generation
    compute exactly what the same weights compute without it, so exports need not know of it."""
    cfg = dict(TINY, dropout=0.3, parallel_residual=parallel)
    torch.manual_seed(0)
    dropped = Transformer(ModelConfig(**cfg))
    plain = Transformer(ModelConfig(**{**cfg, "dropout": 0.0}))
    plain.load_state_dict(dropped.state_dict())
    x = torch.randint(97, (2, 16))
    assert torch.equal(dropped.eval()(x), plain.eval()(x))
    dropped.train()
    a, b = dropped(x), dropped(x)
    assert not torch.allclose(a, b) and not torch.allclose(a, plain(x))
    torch.manual_seed(1)
    c = dropped(x)
    torch.manual_seed(1)
    assert torch.equal(c, dropped(x))  # drawn from torch's generator, which checkpoints save and restore
    with pytest.raises(Exception, match="model.dropout must be in"):
        ModelConfig(**{**cfg, "dropout": 1.0})
