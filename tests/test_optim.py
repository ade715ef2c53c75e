"""Optimizers: the schedules, Muon's update against a reference Newton–Schulz, who gets which optimizer."""

import math

import pytest
import torch

from nomoat.config import ModelConfig, TrainConfig
from nomoat.model import Transformer
from nomoat.optim import lr_at, make_optimizer, newton_schulz

NS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic coefficients, which torch.optim.Muon uses


def test_warmup_cosine_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert values == sorted(values, reverse=True)


def test_warmup_stable_decay_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.0, schedule="wsd", decay_frac=0.2)
    assert lr_at(50, cfg) == lr_at(79, cfg) == 1.0
    assert lr_at(90, cfg) == pytest.approx(0.5)
    assert lr_at(100, cfg) == pytest.approx(0.0)


def reference_newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """X <- aX + b(XX^T)X + c(XX^T)^2 X in float64 from X = G / ||G||_F, on the wide orientation."""
    a, b, c = NS
    x = g.double().T if g.size(0) > g.size(1) else g.double()
    x = x / x.norm()
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if g.size(0) > g.size(1) else x


@pytest.mark.parametrize("shape", [(8, 24), (24, 8), (16, 16)])
def test_newton_schulz_matches_the_reference_and_orthogonalises(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, NS, 5, 1e-7).double()
    ref = reference_newton_schulz(g)
    assert (ours - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 iterations against float64
    s = torch.linalg.svdvals(ref)
    assert s.min() > 0.5 and s.max() < 1.3, s  # singular values pulled to about 1, as Muon intends
    torchs = getattr(torch.optim._muon, "_zeropower_via_newtonschulz", None)  # what unsharded steps run
    if torchs is not None:  # the sharded path (optim.Muon under FSDP) must do the very same arithmetic
        assert torch.equal(newton_schulz(g, NS, 5, 1e-7), torchs(g, NS, 5, 1e-7))


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=16, d_ff=40, max_seq_len=16, norm="rmsnorm",
                      mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False)  # fmt: skip
    return Transformer(cfg)


def test_muon_step_equals_the_reference_update():
    """One step from zero momentum: W <- W(1 - lr wd) - lr sqrt(max(1, rows/cols)) NS(g + m(1-m)g)."""
    model = tiny_model()
    tc = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, muon_momentum=0.95)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    opt.set_lr(tc.lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    for name in ("layers.0.mlp.up_proj.weight", "layers.1.mlp.down_proj.weight", "layers.0.self_attn.q_proj.weight"):
        w, g = before[name].double(), grads[name].double()
        nesterov = g + 0.95 * (0.05 * g)  # grad.lerp(buf, m) with buf = (1 - m) g after the first step
        scale = math.sqrt(max(1.0, w.size(0) / w.size(1)))
        expected = w * (1 - 0.02 * 0.1) - 0.02 * scale * reference_newton_schulz(nesterov)
        got = dict(model.named_parameters())[name].detach().double()
        assert (got - expected).abs().max() < 0.05 * 0.02 * scale, name


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    tc = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, embed_lr=5e-3)
    muon, adamw = make_optimizer(model, tc, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    orth = {names[id(p)] for p in muon.param_groups[0]["params"]}
    rest = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert orth == {n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2}
    assert {"embed_tokens.weight", "lm_head.weight", "norm.weight", "layers.0.input_layernorm.weight"} <= rest
    assert not orth & rest and len(orth | rest) == len(list(model.parameters()))
    opts = make_optimizer(model, tc, torch.device("cpu"))
    opts.set_lr(0.5e-3)  # half the peak: every group at half its own peak
    lrs = sorted({g["lr"] for g in opts.param_groups})
    assert lrs == pytest.approx([0.5e-3, 2.5e-3, 0.01])


def test_adamw_decays_matrices_only():
    model = tiny_model()
    (adamw,) = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    for group in adamw.param_groups:
        assert group["weight_decay"] == (0.1 if group["params"][0].dim() == 2 else 0.0)


def test_without_native_bf16_muon_iterates_in_fp32(monkeypatch):
    """A CPU that emulates bf16 gets the same update from the fp32 iteration, rounded less."""
    monkeypatch.setattr("nomoat.optim.cpu_flags", lambda: {"avx2", "fma"})
    model = tiny_model()
    tc = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    assert opt[0].ns_dtype == torch.float32
    opt.set_lr(tc.lr)
    name = "layers.0.mlp.up_proj.weight"
    w = dict(model.named_parameters())[name]
    before = w.detach().double().clone()
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()))
    g = w.grad.double().clone()
    opt.step()
    scale = math.sqrt(max(1.0, w.size(0) / w.size(1)))
    expected = before * (1 - 0.02 * 0.1) - 0.02 * scale * reference_newton_schulz(g + 0.95 * 0.05 * g)
    assert (w.detach().double() - expected).abs().max() < 1e-4 * 0.02 * scale
    assert opt[0].state[w]["momentum_buffer"].dtype == torch.float32
