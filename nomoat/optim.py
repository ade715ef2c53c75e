"""Optimizers and learning-rate schedules: AdamW, or Muon on the hidden matrices with AdamW on the rest.

Muon (Keller Jordan, 2024; arXiv:2502.16982) replaces each hidden weight matrix's update by its momentum
orthogonalised with a few Newton–Schulz steps; embeddings, the output head, norms and biases are not hidden
matrices and stay with AdamW, as every Muon recipe does. PyTorch's own `torch.optim.Muon` does the arithmetic.
Each param group carries `lr_scale`, its learning rate as a multiple of the schedule's (`lr_at`), so one schedule
drives every group and the groups' rates live in the config. Not here: the loop (`train.py`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from nomoat.config import TrainConfig
from nomoat.device import cpu_flags, native_bf16


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = cfg.steps - int(cfg.decay_frac * cfg.steps)  # wsd, arXiv:2404.06395
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start) / max(1, cfg.steps - decay_start)
    return cfg.lr - (cfg.lr - min_lr) * min(progress, 1.0)


class Optimizers(list):
    """One or more torch optimizers stepped as one; a list, so that torch.distributed.checkpoint's
    get_state_dict/set_state_dict save and load them together, keyed by parameter name."""

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self for g in opt.param_groups]

    def step(self) -> None:
        for opt in self:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self:
            opt.zero_grad(set_to_none=set_to_none)

    def set_lr(self, lr: float) -> None:
        """The schedule's learning rate, times each group's lr_scale."""
        for group in self.param_groups:
            group["lr"] = lr * group["lr_scale"]


def newton_schulz(
    g: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The quintic Newton–Schulz iteration that torch.optim.Muon runs (in bf16, on the wide orientation):
    it maps g = U S V^T to about U V^T, with singular values left near but not at 1."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    x = x.T if tall else x
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """torch.optim.Muon; under FSDP2 each sharded matrix's update gathered whole once per step; and on a CPU
    without native bf16, the iteration in fp32.

    Orthogonalising needs the whole matrix. Left to DTensor, each Newton–Schulz product would communicate on
    its own (measured 10x slower than one process); here the momentum stays sharded (elementwise, local), every
    rank all-gathers the update once, orthogonalises it (the same arithmetic on each rank) and applies its own
    rows. The extra cost is one all-gather of the hidden matrices per step, as FSDP's forward already does.
    torch's Muon iterates in bf16, which a CPU without AVX512-BF16/AMX emulates slowly; `ns_dtype` fp32 there
    keeps the iteration on the fast fp32 kernels (the same arithmetic, rounded less)."""

    def __init__(self, params: Any, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        group = self.param_groups[0]
        sharded = any(hasattr(p, "full_tensor") for p in group["params"])
        if not sharded and self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            whole = update.full_tensor() if sharded else update
            ortho = newton_schulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            local, rank, mine = p, 0, [ortho]
            if sharded:
                local, rank = p.to_local(), p.device_mesh.get_local_rank()
                mine = ortho.chunk(p.device_mesh.size(), dim=0)  # FSDP2 shards dim 0 as torch.chunk does
            local.mul_(1 - lr * wd)
            if rank < len(mine) and local.numel():
                local.add_(mine[rank], alpha=-lr * math.sqrt(max(1, p.shape[0] / p.shape[1])))
        return None


def is_hidden_matrix(name: str, p: torch.nn.Parameter) -> bool:
    """A 2-D weight inside a transformer block: what Muon orthogonalises. The token table and output head
    are lookups and classifiers rather than maps between hidden states, and stay with AdamW."""
    return p.dim() == 2 and name.startswith("layers.")


def _named_trainable(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def _adamw(groups: Iterable[dict[str, Any]], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    fused = device.type in ("cuda", "cpu")  # fused kernels exist for these; others use foreach
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> Optimizers:
    """cfg.optimizer's optimizers over the model's trainable parameters. Weight decay falls on matrices only:
    decaying norms and biases hurts and buys nothing."""
    named = list(_named_trainable(model))
    muon = cfg.optimizer == "muon"
    hidden = [p for n, p in named if is_hidden_matrix(n, p)]
    tables = [p for n, p in named if p.dim() >= 2 and not is_hidden_matrix(n, p)]
    vectors = [p for _, p in named if p.dim() < 2]
    embed_scale = (cfg.embed_lr if cfg.embed_lr is not None else cfg.lr) / cfg.lr
    adamw = _adamw([
        *([] if muon else [{"params": hidden, "weight_decay": cfg.weight_decay, "lr_scale": 1.0}]),
        {"params": tables, "weight_decay": cfg.weight_decay, "lr_scale": embed_scale},
        {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0},
    ], cfg, device)  # fmt: skip
    if not (muon and hidden):
        return Optimizers([adamw])
    # "original": each update scaled by sqrt(max(1, rows / cols)), as Keller Jordan's and nanochat's Muon
    bf16 = device.type != "cpu" or native_bf16(cpu_flags())
    orth = Muon(
        hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum, adjust_lr_fn="original",
        ns_dtype=torch.bfloat16 if bf16 else torch.float32,
    )  # fmt: skip
    orth.param_groups[0]["lr_scale"] = cfg.muon_lr / cfg.lr
    return Optimizers([orth, adamw])
