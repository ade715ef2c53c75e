"""Training throughput of nomoat against Hugging Face `GPT2LMHeadModel` of identical shape, in one process.

Both sides train on the same batch with the same AdamW hyperparameters and gradient clipping: nomoat through
its own trainer's code path (`make_optimizer`, the loss and step of `nomoat.train`), HF as a user of it would
(`labels=` loss, plain `torch.optim.AdamW`). Dropout is off on HF because nomoat has none. Not here: data
loading, evaluation, checkpoints. Usage: `python benchmarks/train_speed.py [--steps 5] [--json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable

import torch

from nomoat.config import ModelConfig, TrainConfig
from nomoat.device import autocast_for, cpu_description
from nomoat.model import Transformer
from nomoat.optim import lr_at, make_optimizer
from nomoat.train import train_step

Step = Callable[[], None]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size (50257 for GPT-2's)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--dim", type=int, default=384, help="d_model; the MLP is 4x wider, as in GPT-2")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant per repeat")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per variant, at least 1 (compiling happens here)"
    )
    p.add_argument("--repeats", type=int, default=3, help="rounds of --steps timed steps; medians are over all of them")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's choice")
    p.add_argument(
        "--compile",
        choices=("both", "eager", "compiled"),
        default="both",
        help="which nomoat variants to time; torch.compile costs a minute or more of CPU the first time",
    )
    p.add_argument(
        "--dtype",
        choices=("both", "float32", "bfloat16"),
        default="both",
        help="bfloat16 runs both sides under CPU autocast; both measures fp32, then bf16",
    )
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def nomoat_step(model: Transformer, compiled: bool, tc: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> Step:
    """One optimizer step through nomoat.train.train_step, the function the training loop calls."""
    device = x.device
    optimizer = make_optimizer(model, tc, device)
    autocast = autocast_for(device, tc.dtype)
    forward = torch.compile(model) if compiled else model
    state = {"step": 0}

    batches = [(x, y)] * tc.grad_accum

    def step() -> None:
        lr = lr_at(state["step"], tc)
        optimizer.set_lr(lr)
        train_step(forward, model, optimizer, batches, tc, autocast, device)
        state["step"] += 1

    return step


def hf_step(model: torch.nn.Module, tc: TrainConfig, x: torch.Tensor) -> Step:
    """One optimizer step as a Hugging Face user writes it: loss from `labels=`, torch's default AdamW."""
    # Decay matrices only, as HF Trainer does (it exempts biases and LayerNorm); the default implementation
    # (foreach=None, fused=None) is what Trainer's `adamw_torch` gets, which on CPU is the per-tensor loop.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if tc.dtype == "bfloat16" else None
    state = {"step": 0}

    def step() -> None:
        lr = lr_at(state["step"], tc)  # same schedule, so both sides do the same arithmetic
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast or contextlib.nullcontext():  # as HF Trainer's bf16=True wraps the forward
            loss = model(input_ids=x, labels=x).loss  # HF shifts labels inside, so x holds all T positions
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1

    return step


def build_hf(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel  # optional dependency, imported only here

    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq_len,
        n_embd=args.dim,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,  # GPT-2's 50256 does not exist in a smaller vocabulary and only draws a warning
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).train()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


def main() -> None:
    args = parse_args()
    args.warmup = max(args.warmup, 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(args, d) for d in (("float32", "bfloat16") if args.dtype == "both" else (args.dtype,))]
    if len(results) == 2:
        key = "nomoat_eager/hf" if "nomoat_eager/hf" in results[0]["ratios"] else next(iter(results[0]["ratios"]))
        ratios = ", ".join(f"{r['dtype']} {r['ratios'][key]:.2f}x" for r in results)
        print(f"summary ({cpu_description()}): {key} {ratios}")
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {"cpu": cpu_description(), "runs": results}))


def measure(args: argparse.Namespace, dtype: str) -> dict:
    """Time nomoat and HF at one precision; print the figures and return them."""
    args = argparse.Namespace(**{**vars(args), "dtype": dtype})
    torch.manual_seed(args.seed)
    tc = TrainConfig(
        batch_size=args.batch, seq_len=args.seq_len, warmup_steps=0, schedule="constant", dtype=args.dtype, device="cpu"
    )
    mc = ModelConfig(
        vocab_size=args.vocab,
        n_layer=args.layers,
        n_head=args.heads,
        d_model=args.dim,
        d_ff=4 * args.dim,
        max_seq_len=args.seq_len,
        norm="layernorm",
        mlp="gelu_tanh",
        pos_emb="learned",
        bias=True,
        tie_embeddings=True,
        init="gpt2",
    )
    tokens = torch.randint(args.vocab, (args.batch, args.seq_len + 1))
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # both sides see B*T tokens per step

    variants = {"eager": False, "compiled": True}
    wanted = list(variants) if args.compile == "both" else [args.compile]
    steps: dict[str, Step] = {}
    models: dict[str, torch.nn.Module] = {}
    for name in wanted:
        torch.manual_seed(args.seed)
        models[f"nomoat_{name}"] = Transformer(mc).train()
        steps[f"nomoat_{name}"] = nomoat_step(models[f"nomoat_{name}"], variants[name], tc, x, y)
    torch.manual_seed(args.seed)
    models["hf"] = build_hf(args)
    steps["hf"] = hf_step(models["hf"], tc, x)

    counts = {name: n_params(m) for name, m in models.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, default compile={TrainConfig().compile}")
    shape = f"V={args.vocab} L={args.layers} H={args.heads} C={args.dim} T={args.seq_len} B={args.batch}"
    print(f"shape: {shape}, {args.dtype}")
    print("parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if len(set(counts.values())) != 1:
        raise SystemExit("parameter counts differ: the two models do not have the same shape")

    first_step_s: dict[str, float] = {}  # for the compiled model this is mostly compilation
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        first_step_s[name] = time.perf_counter() - t0
        for _ in range(args.warmup - 1):
            step()
        print(f"warmup {name}: first step {first_step_s[name]:.1f}s", flush=True)

    # Interleave single steps (nomoat, HF, nomoat, HF, ...): a shared machine's slow spells then hit every
    # variant alike instead of landing on whichever block happened to run at the time.
    times: dict[str, list[float]] = {name: [] for name in steps}
    tokens_per_step = args.batch * args.seq_len
    order = list(steps)
    for r in range(args.repeats):
        for i in range(args.steps):
            for name in order[i % len(order) :] + order[: i % len(order)]:  # rotate who goes first
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
        block = {name: tokens_per_step * args.steps / sum(t[-args.steps :]) for name, t in times.items()}
        print(f"repeat {r + 1}: " + ", ".join(f"{n} {v:,.0f} tok/s" for n, v in block.items()), flush=True)

    rates = {name: [tokens_per_step / t for t in ts] for name, ts in times.items()}
    median = {name: statistics.median(v) for name, v in rates.items()}
    best = {name: max(v) for name, v in rates.items()}
    # Each ratio is the median over rounds of HF's step time over nomoat's in the same round: pairs of steps
    # run seconds apart, so the machine's load cancels within a pair even when it drifts between rounds.
    ratios = {
        f"{name}/hf": statistics.median(h / n for h, n in zip(times["hf"], ts, strict=True))
        for name, ts in times.items()
        if name != "hf"
    }
    for name in median:
        print(f"{name:>16}: median {median[name]:,.0f} tok/s, best {best[name]:,.0f} tok/s")
    headline = "nomoat_compiled" if TrainConfig().compile else "nomoat_eager"
    for key, value in ratios.items():
        mark = "  <- nomoat's default" if key.startswith(headline) and args.dtype == "float32" else ""
        print(f"ratio {key}: {value:.2f}x{mark}")
    if "nomoat_compiled" in first_step_s:
        print(f"compile: the first compiled step took {first_step_s['nomoat_compiled']:.1f}s")
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {k: vars(args)[k] for k in ("vocab", "layers", "heads", "dim", "seq_len", "batch")},
        "dtype": args.dtype,
        "params": counts["hf"],
        "tokens_per_s": median,
        "tokens_per_s_best": best,
        "ratios": ratios,
        "headline": f"{headline}/hf" if f"{headline}/hf" in ratios and args.dtype == "float32" else None,
        "first_step_s": first_step_s,
    }


if __name__ == "__main__":
    main()
