"""The training loop: one plain loop for pretraining and fine-tuning, with checkpoints that resume bit for bit.

Here: optimizer construction, learning-rate schedules (pure functions of the step), the loop with gradient
accumulation, clipping, periodic validation, JSONL metrics with throughput and MFU, checkpoints and the loss
plot. Not here: the model's math (`model.py`), batching (`data/`), ranks and sharding (`distributed.py` wraps
the model from outside), what fine-tuning changes (it passes its own `Setup`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tomli_w
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nomoat import distributed
from nomoat.checkpoint import (
    frozen_sha256,
    list_checkpoints,
    load_train_state,
    read_trainer_state,
    save_checkpoint,
    save_weights,
)
from nomoat.config import RunConfig, TrainConfig, absolute_paths, from_dict, read_toml, replace, to_dict
from nomoat.data import ShardSet, TokenLoader, check_tokenizer_matches
from nomoat.device import autocast_for, choose_precision, peak_flops, pick_device
from nomoat.errors import UserError
from nomoat.eval import evaluate_loss
from nomoat.model import Transformer
from nomoat.optim import Optimizers, lr_at, make_optimizer
from nomoat.tokenizer import Tokenizer

# A batch's loss and the metrics to log beside it (named as the reference trainers name them), from the forward
# (model or DDP wrapper) and the batch as the loader yields it, already on the device.
Loss = Callable[[Callable[..., torch.Tensor], tuple[torch.Tensor, ...]], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def next_token_loss(
    forward: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over the scored targets of (x, y, [segments]); targets of -100 (prompt tokens and
    padding in fine-tuning) are not scored, segments are the sample ids of packed fine-tuning rows."""
    x, y, *segments = batch
    logits = forward(x, segments=segments[0]) if segments else forward(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), {}


def train_step(
    forward: Callable[..., torch.Tensor],
    model: torch.nn.Module,
    optimizer: Optimizers,
    batches: list[tuple[torch.Tensor, ...]],
    tc: TrainConfig,
    autocast: torch.autocast | None,
    device: torch.device,
    loss_fn: Loss = next_token_loss,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One optimizer step over this process's micro-batches; returns (mean loss, grad norm before clipping,
    loss_fn's metrics averaged over the micro-batches).

    `forward` is the model itself or its DDP wrapper; the benchmarks call this same function."""
    loss_sum = torch.zeros((), device=device)
    metrics: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        distributed.set_grad_sync(forward, i == len(batches) - 1)
        with autocast or contextlib.nullcontext():
            loss, found = loss_fn(forward, batch)
        loss = loss / len(batches)
        loss.backward()
        loss_sum += loss.detach()
        for name, value in found.items():
            metrics[name] = metrics.get(name, 0) + value.detach() / len(batches)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, distributed.full_norm(grad_norm), metrics


def training_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token (6N plus attention) for models that report them, else 6N."""
    if hasattr(model, "flops_per_token"):
        return float(model.flops_per_token(seq_len))
    return 6.0 * sum(p.numel() for p in model.parameters())


def config_text(cfg: RunConfig) -> str:
    return tomli_w.dumps(to_dict(cfg))


UNDECIDED_STEPS = 2**62  # a time-budgeted run's step count until its first steps are timed
BUDGET_PROBE_STEPS, BUDGET_PROBE_SHARE = 10, 0.05  # it is fixed after >= 10 steps and 5% of the budget


class Abandoned(Exception):
    """Raised by the signal handler inside `StopFlag.abandonable()`: the work there is cut short."""


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to save and stop after the current step; a second one stops at once.
    Inside `abandonable()` (validation, which changes nothing a checkpoint holds) the first one also ends that
    work at once, so that a long validation does not keep the user waiting for the checkpoint."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.urgent = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None:  # a second signal means "now": give up on the checkpoint
                raise KeyboardInterrupt
            self.signum = signum
            if self.urgent:
                self.urgent = False
                raise Abandoned

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    @contextlib.contextmanager
    def abandonable(self, allowed: bool = True) -> Iterator[None]:
        """Work that a signal ends at once by raising Abandoned (also one that came just before it)."""
        if allowed and self.signum is not None:
            raise Abandoned
        self.urgent = allowed
        try:
            yield
        finally:
            self.urgent = False


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


@dataclasses.dataclass
class Setup:
    """What differs between pretraining and fine-tuning: the batches, the trainable parameters, what is saved.

    `loader` yields batches for `loss` (by default (x, y) token batches (B, T) where y == -100 is not scored),
    and has state_dict() and load_state_dict(); `export` writes the inference artefact into a checkpoint folder."""

    model: torch.nn.Module
    loader: Any
    tokenizer: Tokenizer
    loss: Loss = next_token_loss
    val: Callable[[torch.nn.Module], dict[str, float]] | None = None
    export: Callable[[torch.nn.Module, Path], None] = save_weights
    manifest: dict[str, Any] | None = None
    extra_files: list[Path] = dataclasses.field(default_factory=list)


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


VOCAB_MULTIPLE = 64  # a token table rounded up to a multiple of 64 rows multiplies faster


def vocab_from_tokenizer(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """cfg with model.vocab_size following data.tokenizer, rounded up to a multiple of 64, and the line that
    says so (None when the vocabulary already fits the tokenizer that snugly). The CLI applies it when the user
    did not choose model.vocab_size (a preset's value is a default): a preset's number never fits every
    tokenizer, and a larger one only adds rows that are never trained."""
    if not cfg.data.tokenizer:
        return cfg, None
    have = Tokenizer.load(cfg.data.tokenizer).vocab_size
    want = -(-have // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if have <= cfg.model.vocab_size <= want:
        return cfg, None
    line = (
        f"model.vocab_size {want} for the tokenizer's {have:,} tokens, not the config's {cfg.model.vocab_size} "
        "(--model.vocab_size sets it)"
    )
    return replace(cfg, model={"vocab_size": want}), line


def pretraining_setup(cfg: RunConfig, device: torch.device, resume: bool = False, progress: bool = False) -> Setup:
    """A fresh model from cfg.model over the token shards of cfg.data. A resumed run reads the tokenizer its
    checkpoint holds, which stays put when the file the run started from moves."""
    tc = cfg.train
    if not cfg.data.shards or not cfg.data.tokenizer:
        raise UserError("data.shards and data.tokenizer must be set (build them with `nomoat data build`)")
    found = list_checkpoints(tc.out_dir) if resume else []
    tokenizer_file = found[-1] / "tokenizer.json" if found else Path(cfg.data.tokenizer)
    tokenizer = Tokenizer.load(tokenizer_file)
    train_set = ShardSet(cfg.data.shards, "train", verify=cfg.data.verify)
    check_tokenizer_matches(train_set.manifest, tokenizer, str(tokenizer_file))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(
            f"{cfg.data.tokenizer}: tokenizer has {tokenizer.vocab_size} tokens, "
            f"more than model.vocab_size {cfg.model.vocab_size} (raise it, or leave it unset to follow the tokenizer)"
        )
    val_set = ShardSet(cfg.data.shards, "val", verify=cfg.data.verify) if _has_val(train_set) else None
    autocast = autocast_for(device, tc.dtype)

    def validate(model: torch.nn.Module) -> dict[str, float]:
        return evaluate_loss(
            model, val_set, tc.batch_size, tc.seq_len, tc.eval_batches, device, autocast, progress=progress
        )

    torch.manual_seed(tc.seed)
    datasheet = Path(cfg.data.shards) / "datasheet.json"  # written by a corpus recipe; travels with the model
    return Setup(
        model=Transformer(cfg.model).to(device),
        loader=TokenLoader(train_set, tc.batch_size, tc.seq_len, seed=tc.seed),
        tokenizer=tokenizer,
        val=validate if val_set is not None else None,
        manifest=train_set.manifest,
        extra_files=[datasheet] if datasheet.is_file() else [],
    )


class Clock:
    """Training seconds and tokens/s between log rows; time spent validating and saving is left out.
    `seconds` counts from the run's start, earlier sessions of a resumed run included (`offset`)."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = self.seconds = offset
        self.last, self.tokens, self.total = time.perf_counter(), 0, 0

    def add(self, tokens: int) -> None:
        """Tokens a step put through the model (all ranks): since the last lap, and in this session."""
        self.tokens += tokens
        self.total += tokens

    def restart(self) -> None:
        """Count from here: what came before (building the model, loading a checkpoint) is not training."""
        self.last = time.perf_counter()

    def now(self) -> float:
        """Training seconds so far, up to this moment."""
        return self.seconds + time.perf_counter() - self.last

    def lap(self) -> float:
        """Tokens per second since the last lap, whose time is added to the training seconds."""
        now = time.perf_counter()
        self.seconds += now - self.last
        rate = self.tokens / (now - self.last)
        self.last, self.tokens = now, 0
        return rate

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last += time.perf_counter() - start


class Run:
    """One training run's parts and bookkeeping: the model wrapped for this world, its optimizer, where it
    saves and logs. `train` drives it; the loop itself stays in `train` so that it reads in one screen."""

    def __init__(
        self, cfg: RunConfig, setup: Setup, world: distributed.World, device: torch.device, decisions: dict[str, Any]
    ) -> None:
        self.cfg, self.tc, self.setup, self.world, self.device = cfg, cfg.train, setup, world, device
        self.decisions = dict(decisions)  # what the run settled for itself (precision, a time budget's steps)
        if self.tc.time_budget:  # until the budget's steps are fixed: a schedule that has not begun to decay
            self.tc = dataclasses.replace(self.tc, steps=UNDECIDED_STEPS)
        self.settle_warmup()
        self.clock, self.budget_start = Clock(), 0.0
        self.run_dir = Path(self.tc.out_dir)
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.model, self.loader = setup.model, setup.loader
        self.frozen = frozen_sha256(self.model)  # a LoRA run's base: its checkpoints hold only what trains
        precision_by_fsdp = distributed.uses_fsdp_precision(self.tc, device, world)
        self.autocast = None if precision_by_fsdp else autocast_for(device, self.tc.dtype)
        self.forward = distributed.parallelize(self.model, self.tc, device, world)
        self.optimizer = make_optimizer(self.model, self.tc, device)
        self.tokens_per_step = self.tc.batch_size * self.tc.seq_len * self.tc.grad_accum
        self.flops_per_token = training_flops_per_token(self.model, self.tc.seq_len)
        self.peak = peak_flops(device) * world.size

    def start(self, resume: bool) -> int:
        """The step to start from: 0 for a new run folder, the newest checkpoint's step when resuming."""
        start_step = 0
        found = check_run_folder(self.run_dir, resume)
        if resume:
            saved = from_dict(read_toml(found[-1] / "config.toml"), where=str(found[-1] / "config.toml"))
            if diff := _config_diff(saved.model, self.cfg.model, "model"):
                raise UserError(f"cannot resume {found[-1]} with a different model config ({'; '.join(diff)})")
            state = read_trainer_state(found[-1])
            self.check_frozen(found[-1], state.get("frozen_sha256"))
            load_train_state(found[-1], self.model, self.optimizer)
            self.loader.load_state_dict(state["loader"])
            torch.set_rng_state(state["rng"])
            start_step = state["step"]
            self.clock = Clock(offset=state.get("train_seconds", 0.0))
            earlier = state.get("decisions", {})
            if self.tc.time_budget and "steps" in earlier:  # the budget's step count, kept: the same schedule
                self.fix_steps(earlier["steps"], earlier["steps_reason"])
            if self.world.main:  # rows logged after that checkpoint came from work now lost
                rows = _read_metrics(self.metrics_file, start_step)
                self.metrics_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif self.world.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.metrics_file.write_text("")
        distributed.barrier(self.world)
        if (why := self.decisions.get("warmup_reason")) and self.world.main:  # said once the folder checks pass
            warnings.warn(why, stacklevel=2)
        self.log({"step": start_step, "elapsed_s": self.clock.seconds, **self.decisions})
        return start_step

    def fix_steps(self, steps: int, reason: str) -> str | None:
        self.tc = dataclasses.replace(self.tc, steps=steps)
        self.cfg = dataclasses.replace(self.cfg, train=self.tc)
        self.decisions |= {"steps": steps, "steps_reason": reason}
        return self.settle_warmup()

    def settle_warmup(self) -> str | None:
        """A warm-up that would not end before the run does (the default 100 steps in a 30-step fine-tune, whose
        rate would never reach its peak) is cut to a tenth of the run; the saved config and the decisions record
        what ran, so a resumed run keeps it. Returns the line that says so, to be warned of."""
        tc = self.tc
        if tc.warmup_steps < tc.steps:
            return None
        warmup = tc.steps // 10
        why = f"train.warmup_steps {tc.warmup_steps} would not end within the run's {tc.steps} steps: "
        why += f"warming up over {warmup} instead"
        self.tc = dataclasses.replace(tc, warmup_steps=warmup)
        self.cfg = dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train, warmup_steps=warmup))
        self.decisions |= {"warmup_steps": warmup, "warmup_reason": why}
        return why

    def check_frozen(self, checkpoint: Path, saved: str | None) -> None:
        """A checkpoint of a model with frozen weights holds only what trains; resuming over other frozen
        weights (the base changed since) would not continue the same run."""
        if saved is not None and saved != self.frozen:
            base = self.cfg.finetune.base if self.cfg.finetune else "the base model"
            raise UserError(
                f"cannot resume {checkpoint}: its frozen weights had sha256 {saved[:12]}, those of {base} now "
                f"{(self.frozen or 'none')[:12]} (the base model changed since)"
            )

    def spend_budget(self, step: int) -> bool:
        """For train.time_budget: time the steps after the first (which compiles and warms caches) over 5% of
        the budget, then fix the step count that fills it, so that the schedule decays to the end. The decision
        is all-or-nothing from then on (train time, not validation, counts). True once fixed."""
        if not self.tc.time_budget or "steps" in self.decisions:
            return False
        if step == 1:
            self.budget_start = self.clock.now()
            return False
        now = self.clock.now()
        timed = now - self.budget_start
        if step < 1 + BUDGET_PROBE_STEPS or timed < BUDGET_PROBE_SHARE * self.tc.time_budget:
            return False
        per_step = distributed.from_main(timed / (step - 1), self.world)
        steps = step + max(0, int((self.tc.time_budget - now) / per_step))
        why = self.fix_steps(steps, f"train.time_budget {self.tc.time_budget:g}s at {per_step:.3f}s per step")
        if why and self.world.main:  # the budget's steps are fewer than the warm-up's
            warnings.warn(why, stacklevel=2)
        self.log({"step": step, "elapsed_s": now, "steps": steps, "steps_reason": self.decisions["steps_reason"]})
        return True

    def step(self, step: int) -> tuple[float, int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """One optimizer step at the schedule's learning rate: (lr, tokens, summed loss, grad norm, the loss's
        metrics). Tokens are the input positions the model ran, padding and DPO's chosen and rejected rows
        included (as this rank's times the world size): for pretraining batch_size x seq_len x grad_accum."""
        lr = lr_at(step, self.tc)
        self.optimizer.set_lr(lr)
        batches = distributed.micro_batches(self.loader, self.tc.grad_accum, self.world)
        tokens = sum(batch[0].numel() for batch in batches) * self.world.size
        return (
            lr,
            tokens,
            *train_step(
                self.forward, self.model, self.optimizer, batches, self.tc, self.autocast, self.device, self.setup.loss
            ),
        )

    def log_step(
        self, step: int, lr: float, loss_sum: torch.Tensor, grad_norm: torch.Tensor, clock: Clock,
        metrics: dict[str, torch.Tensor],
    ) -> dict:  # fmt: skip
        loss = distributed.mean_over_ranks(loss_sum, self.world).item()
        tokens, tok_s = clock.tokens, clock.lap()
        row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens": tokens}
        row["tokens_per_s"] = tok_s
        row |= {name: distributed.mean_over_ranks(v, self.world).item() for name, v in metrics.items()}
        row["elapsed_s"] = clock.seconds
        row["flops_per_s"] = self.flops_per_token * tok_s
        if self.peak:
            row["mfu"] = row["flops_per_s"] / self.peak
        self.log(row)
        return row

    def log(self, row: dict[str, Any]) -> None:
        if self.world.main:
            with self.metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")

    def validate(self, step: int, stop: StopFlag) -> dict[str, float] | None:
        """Validation metrics, logged; None when a signal cut it short. With one process a signal ends it at
        once; ranks finish it together, since each forward of a sharded model is a collective."""
        assert self.setup.val is not None
        elapsed = self.clock.now()
        self.model.eval()
        try:
            with stop.abandonable(self.world.size == 1):
                result = self.setup.val(self.forward)
                if self.tc.eval_tasks:  # zero/few-shot task metrics, logged with the loss (nomoat.eval.tasks)
                    from nomoat.eval.tasks import task_metrics

                    model = distributed.unwrap(self.model)
                    result |= task_metrics(model, self.setup.tokenizer, self.tc.eval_tasks)
        except Abandoned:
            return None
        finally:
            self.model.train()
        self.log({"step": step, "elapsed_s": elapsed, **result})
        return result

    def save(self, step: int) -> Path:
        trainer = {"step": step, "rng": torch.get_rng_state(), "loader": self.loader.state_dict()}
        trainer |= {"train_seconds": self.clock.now(), "decisions": self.decisions}
        if self.frozen is not None:  # the base's identity, checked on resume (state/ holds only what trains)
            trainer["frozen_sha256"] = self.frozen
        s = self.setup
        return save_checkpoint(
            self.run_dir, step, self.model, self.cfg, s.tokenizer, s.manifest, trainer, self.tc.keep_last,
            s.extra_files, optimizer=self.optimizer, export=s.export, world=self.world,
        )  # fmt: skip

    def result(self, step: int, start_step: int, loss: float, val: dict[str, float], clock: Clock) -> TrainResult:
        """The run's summary; the last train loss comes from the metrics file, or this rank's own last log."""
        train_rows = [r for r in _read_metrics(self.metrics_file, step) if "loss" in r]
        return TrainResult(
            run_dir=self.run_dir,
            step=step,
            train_loss=train_rows[-1]["loss"] if train_rows else loss,
            val_loss=val.get("val_loss"),
            val_bpb=val.get("val_bpb"),
            train_seconds=clock.seconds - clock.offset,  # this session's, when resumed
            tokens_per_s=clock.total / (clock.seconds - clock.offset or 1.0),
            checkpoint=list_checkpoints(self.run_dir)[-1],
        )


def check_run_folder(run_dir: str | Path, resume: bool) -> list[Path]:
    """The run folder's checkpoints, if the run may start there: resuming needs one, a new run none. Fine-tuning
    asks before it loads its base, so that a wrong folder is named at once."""
    found = list_checkpoints(run_dir)
    if resume and not found:
        raise UserError(f"{run_dir}: no checkpoint to resume from")
    if not resume and found:
        raise UserError(f"{run_dir} already holds checkpoints: pass --resume, or choose another train.out_dir")
    return found


def _check_eval_tasks(tc: TrainConfig) -> None:
    """A bad task file fails now, not at the first validation an hour in."""
    if tc.eval_tasks:
        from nomoat.eval.tasks import parse_task_arg, read_items

        for arg in tc.eval_tasks:
            read_items(*parse_task_arg(arg))


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, setup: Setup | None = None) -> TrainResult:
    """Train per cfg; with resume, continue from the newest checkpoint in cfg.train.out_dir.

    Without a setup this is pretraining; fine-tuning passes its own. Under torchrun each process runs this same
    function: `distributed` wraps the model and hands each rank its slice of every global batch."""
    world = distributed.init(pick_device(cfg.train.device))
    try:
        device = distributed.local_device(pick_device(cfg.train.device), world)
        distributed.check_same_config(config_text(cfg), world)
        cfg = absolute_paths(cfg)  # as the checkpoints save it: their config.toml works from any directory
        cfg, decisions = settle_precision(cfg, device, world, resume)
        run = Run(cfg, setup or pretraining_setup(cfg, device, resume, progress), world, device, decisions)
        _check_eval_tasks(cfg.train)
        step = start_step = run.start(resume)
        if progress and world.main:
            _announce(run)
        run.model.train()
        total = None if run.tc.steps == UNDECIDED_STEPS else run.tc.steps
        bar = tqdm(total=total, initial=step, disable=not (progress and world.main), unit="step", dynamic_ncols=True)
        stop, clock, val, loss = StopFlag(), run.clock, {}, float("nan")
        clock.restart()
        with stop.installed():
            while step < run.tc.steps:
                tc = run.tc
                lr, tokens, loss_sum, grad_norm, metrics = run.step(step)
                step += 1
                clock.add(tokens)
                if run.spend_budget(step):
                    bar.total = run.tc.steps
                is_last = step == run.tc.steps
                if step % tc.log_every == 0 or is_last:
                    row = run.log_step(step, lr, loss_sum, grad_norm, clock, metrics)
                    loss = row["loss"]
                    bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
                bar.update(1)
                abandoned = False  # a validation cut short by a signal: the run stops, even at its last step
                if run.setup.val is not None and ((tc.eval_every and step % tc.eval_every == 0) or is_last):
                    with clock.paused():
                        done = run.validate(step, stop)
                    abandoned, val = done is None, val if done is None else done
                    if progress and world.main and done and "val_loss" in done:
                        line = f"step {step}: val loss {val['val_loss']:.4f}"
                        line += f", {val['val_bpb']:.4f} bits per byte" if "val_bpb" in val else ""
                        bar.write(line, sys.stderr)
                if distributed.any_rank(stop.signum is not None, world) and (abandoned or not is_last):
                    bar.close()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, run.save(step))
                if (tc.save_every and step % tc.save_every == 0) or is_last:
                    with clock.paused():
                        run.save(step)
        bar.close()
        if world.main:
            plot_losses(run.metrics_file, run.run_dir / "loss.png")
        return run.result(step, start_step, loss, val, clock)
    finally:
        distributed.shutdown()


def _announce(run: Run) -> None:
    """What is about to train, on stderr: a TOML without [model] trains GPT-2 124M, which should not surprise."""
    m, tc = run.cfg.model, run.tc
    params = sum(p.numel() for p in run.model.parameters())
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    size = f"{params:,} parameters" + (f", {trainable:,} of them trained" if trainable != params else "")
    per_step = f"{run.tokens_per_step:,} tokens per step ({tc.batch_size} x {tc.seq_len} x {tc.grad_accum} accumulated)"
    print(f"model: {m.n_layer} layers x {m.d_model}, {size}; {per_step}", file=sys.stderr)
    print(f"precision: {run.decisions['dtype']} ({run.decisions['dtype_reason']})", file=sys.stderr)


def settle_precision(
    cfg: RunConfig, device: torch.device, world: distributed.World, resume: bool
) -> tuple[RunConfig, dict[str, Any]]:
    """cfg with train.dtype resolved to float32 or bfloat16 (device.choose_precision), and the decision to
    record. A resumed `auto` run keeps its checkpoint's choice, so resume stays exact on any machine."""
    tc = cfg.train
    found = list_checkpoints(tc.out_dir) if resume and tc.dtype == "auto" else []
    earlier = read_trainer_state(found[-1]).get("decisions", {}) if found else {}
    if "dtype" in earlier:
        dtype, why = earlier["dtype"], earlier["dtype_reason"]
    else:
        m = cfg.model
        shape = (
            f"{m.n_layer}x{m.d_model} ff{m.d_ff} h{m.n_head}/{m.kv_heads} v{m.vocab_size} {m.mlp}, "
            f"batch {tc.batch_size}x{tc.seq_len}, compile {tc.compile}, recompute {tc.activation_checkpointing}"
        )
        chosen = choose_precision(device, tc.dtype, shape, _probe(cfg, device)) if world.main else None
        dtype, why = distributed.from_main(chosen, world)
    return replace(cfg, train={"dtype": dtype}), {"dtype": dtype, "dtype_reason": why}


def _probe(cfg: RunConfig, device: torch.device) -> Callable[[bool], float]:
    """Seconds per forward and backward of a fresh cfg.model on one micro-batch of random tokens, with or
    without bf16 autocast (the fastest of 3 after one untimed); the run's RNG is left as it was."""

    def seconds(bf16: bool) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = Transformer(cfg.model).to(device).train()
            if cfg.train.compile:
                model.compile()
            x = torch.randint(cfg.model.vocab_size, (cfg.train.batch_size, cfg.train.seq_len), device=device)
            autocast = autocast_for(device, "bfloat16" if bf16 else "float32")
            times = []
            for _ in range(4):
                start = time.perf_counter()
                with autocast or contextlib.nullcontext():
                    logits = model(x)
                F.cross_entropy(logits.float().flatten(0, 1), x.flatten()).backward()
                times.append(time.perf_counter() - start)
            return min(times[1:])

    return seconds


def _has_val(train_set: ShardSet) -> bool:
    return train_set.manifest["splits"]["val"]["tokens"] > 0


def loss_panels(train_rows: list[dict[str, Any]], val_rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(metrics key, axis label) of each loss panel: against step, and against training seconds when every row
    has them (metrics from before elapsed_s was logged do not)."""
    timed = all("elapsed_s" in r for r in train_rows + val_rows)
    return [("step", "step")] + ([("elapsed_s", "training seconds")] if timed else [])


def draw_losses(axes: Any, panels: list[tuple[str, str]], train_rows: list[dict], val_rows: list[dict]) -> None:
    """Train and validation loss on each panel's axis: the run's loss.png and the report card draw the same."""
    for ax, (key, label) in zip(axes, panels, strict=False):
        ax.plot([r[key] for r in train_rows], [r["loss"] for r in train_rows], label="train")
        if val_rows:
            ax.plot([r[key] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats per token)")
        ax.grid(alpha=0.3)
        ax.legend()


def plot_losses(metrics_file: Path, out: Path) -> None:
    """Train and validation loss against step and against training seconds (quality per wall-clock second is
    what runs are compared by), for a glance at the run without a dashboard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_metrics(metrics_file, 2**62)
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    panels = loss_panels(train_rows, val_rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(11 if len(panels) == 2 else 7, 4), squeeze=False)
    draw_losses(axes[0], panels, train_rows, val_rows)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
