"""The training loop: one plain loop for pretraining, with checkpoints that resume bit for bit.

Here: optimizer construction, learning-rate schedules (pure functions of the step), the loop with gradient
accumulation, clipping, periodic validation, JSONL metrics, checkpoints and the loss plot. Not here: the model's
math (`model.py`), batching (`data/`), ranks and sharding (a later `distributed.py` wraps the model from outside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nomoat.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from nomoat.config import RunConfig, TrainConfig
from nomoat.data import ShardSet, TokenLoader, check_tokenizer_matches
from nomoat.errors import UserError
from nomoat.eval import evaluate_loss
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer


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


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: decaying norms and biases hurts and buys nothing."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.type in ("cuda", "cpu")  # fused kernels exist for these; others use foreach
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def train_step(
    forward: Callable[[torch.Tensor], torch.Tensor],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    tc: TrainConfig,
    autocast: torch.autocast | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over tc.grad_accum micro-batches; returns (mean loss, grad norm before clipping).

    `forward` is the model itself or its torch.compile wrapper; the benchmark calls this same function.
    """
    loss_sum = torch.zeros((), device=device)
    for _ in range(tc.grad_accum):
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast or contextlib.nullcontext():
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / tc.grad_accum
        loss.backward()
        loss_sum += loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str) -> torch.autocast | None:
    """bf16 autocast on GPU; CPUs without native bf16 run it far slower, so they stay in fp32."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step; a second one stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None:  # a second signal means "now": give up on the checkpoint
                raise KeyboardInterrupt
            self.signum = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


class TrainingInterrupted(Exception):
    """Raised after the checkpoint of an interrupted run is safely written."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_loss: float
    val_loss: float | None
    val_bpb: float | None
    train_seconds: float
    tokens_per_s: float
    checkpoint: Path


def _read_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Metrics logged up to and including a step; later lines came from work lost since the checkpoint."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def _config_diff(a: Any, b: Any, section: str) -> list[str]:
    return [
        f"{section}.{f.name}: {getattr(a, f.name)!r} -> {getattr(b, f.name)!r}"
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    ]


def train(cfg: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train per cfg; with resume, continue from the newest checkpoint in cfg.train.out_dir."""
    tc = cfg.train
    run_dir = Path(tc.out_dir)
    device = pick_device(tc.device)
    autocast = autocast_for(device, tc.dtype)
    if not cfg.data.shards or not cfg.data.tokenizer:
        raise UserError("data.shards and data.tokenizer must be set (build them with `nomoat data build`)")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    train_set = ShardSet(cfg.data.shards, "train", verify=cfg.data.verify)
    check_tokenizer_matches(train_set.manifest, tokenizer, cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{cfg.data.tokenizer}: tokenizer has {tokenizer.vocab_size} tokens, "
            f"more than model.vocab_size {cfg.model.vocab_size}"
        )
    val_set = ShardSet(cfg.data.shards, "val", verify=cfg.data.verify) if _has_val(train_set) else None

    torch.manual_seed(tc.seed)
    model = Transformer(cfg.model).to(device)
    optimizer = make_optimizer(model, tc, device)
    loader = TokenLoader(train_set, tc.batch_size, tc.seq_len, seed=tc.seed)
    start_step = 0
    metrics_file = run_dir / "metrics.jsonl"
    if resume:
        found = list_checkpoints(run_dir)
        if not found:
            raise UserError(f"{run_dir}: no checkpoint to resume from")
        ckpt = load_checkpoint(found[-1], device=device, trainer_state=True)
        diff = _config_diff(ckpt.cfg.model, cfg.model, "model")
        if diff:
            raise UserError(f"cannot resume {found[-1]} with a different model config ({'; '.join(diff)})")
        model.load_state_dict(ckpt.model.state_dict())
        state = ckpt.trainer
        optimizer.load_state_dict(state["optimizer"])
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        start_step = state["step"]
        rows = _read_metrics(metrics_file, start_step)
        metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif list_checkpoints(run_dir):
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume, or choose another train.out_dir")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_file.write_text("")

    forward = torch.compile(model) if tc.compile else model
    manifest = train_set.manifest
    datasheet = Path(cfg.data.shards) / "datasheet.json"  # written by a corpus recipe; travels with the model
    extra_files = [datasheet] if datasheet.is_file() else []
    tokens_per_step = tc.batch_size * tc.seq_len * tc.grad_accum

    def save(step: int) -> Path:
        trainer = {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": torch.get_rng_state(),
            "loader": loader.state_dict(),
        }
        return save_checkpoint(run_dir, step, model, cfg, tokenizer, manifest, trainer, tc.keep_last, extra_files)

    def log(row: dict[str, Any]) -> None:
        with metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def validate(step: int) -> dict[str, float]:
        result = evaluate_loss(model, val_set, tc.batch_size, tc.seq_len, tc.eval_batches, device, autocast)
        log({"step": step, **result})
        return result

    model.train()
    bar = tqdm(total=tc.steps, initial=start_step, disable=not progress, unit="step", dynamic_ncols=True)
    stop = StopFlag()
    val: dict[str, float] = {}
    loss_value = float("nan")
    train_seconds, t_last, tokens_since = 0.0, time.perf_counter(), 0
    step = start_step
    with stop.installed():
        while step < tc.steps:
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, grad_norm = train_step(forward, model, optimizer, loader, tc, autocast, device)
            step += 1
            tokens_since += tokens_per_step

            if step % tc.log_every == 0 or step == tc.steps:
                loss_value = loss_sum.item()
                now = time.perf_counter()
                train_seconds += now - t_last
                tok_s = tokens_since / (now - t_last)
                t_last, tokens_since = now, 0
                log(
                    {
                        "step": step,
                        "loss": loss_value,
                        "lr": lr,
                        "grad_norm": grad_norm.item(),
                        "tokens_per_s": tok_s,
                    }
                )
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            bar.update(1)

            is_last = step == tc.steps
            if val_set is not None and ((tc.eval_every and step % tc.eval_every == 0) or is_last):
                pause = time.perf_counter()
                val = validate(step)
                t_last += time.perf_counter() - pause  # validation time is not training time
                if progress:
                    line = f"step {step}: val loss {val['val_loss']:.4f}, {val['val_bpb']:.4f} bits per byte"
                    bar.write(line, sys.stderr)
            if stop.signum is not None and not is_last:
                bar.close()
                raise TrainingInterrupted(stop.signum, save(step))
            if (tc.save_every and step % tc.save_every == 0) or is_last:
                pause = time.perf_counter()
                save(step)
                t_last += time.perf_counter() - pause
    bar.close()
    plot_losses(metrics_file, run_dir / "loss.png")
    rows = _read_metrics(metrics_file, step)
    train_rows = [r for r in rows if "loss" in r]
    return TrainResult(
        run_dir=run_dir,
        step=step,
        train_loss=train_rows[-1]["loss"] if train_rows else loss_value,
        val_loss=val.get("val_loss"),
        val_bpb=val.get("val_bpb"),
        train_seconds=train_seconds,  # this session's, when resumed
        tokens_per_s=(step - start_step) * tokens_per_step / train_seconds if train_seconds else 0.0,
        checkpoint=list_checkpoints(run_dir)[-1],
    )


def _has_val(train_set: ShardSet) -> bool:
    return train_set.manifest["splits"]["val"]["tokens"] > 0


def plot_losses(metrics_file: Path, out: Path) -> None:
    """Train and validation loss against step, for a glance at the run without a dashboard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(metrics_file, 2**62)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    if val_rows:
        ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
