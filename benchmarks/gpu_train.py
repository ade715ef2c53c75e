"""Training throughput and MFU on one GPU for a preset's shape, through the training loop's own step.

bf16 autocast, fused AdamW, SDPA and per-block torch.compile, exactly as `nomoat train` sets them up
(nomoat.distributed.parallelize, nomoat.train.train_step). Random tokens: throughput does not depend on them.
MFU = model FLOPs per token (6N + attention, PaLM appendix B) x tokens/s / the device's dense bf16 peak.

    python benchmarks/gpu_train.py --preset llama-1b --batch-size 4 --seq-len 4096
    python benchmarks/gpu_train.py --preset gpt2-124m --dry-run     # tiny shape on CPU: checks the script only
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nomoat import distributed
from nomoat.config import load_config, replace
from nomoat.device import autocast_for, peak_flops, pick_device
from nomoat.model import Transformer
from nomoat.optim import lr_at, make_optimizer
from nomoat.train import train_step


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1b")
    p.add_argument("--steps", type=int, default=100, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="a tiny version of the shape on CPU, a few steps")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def main() -> None:
    args = parse()
    cfg = load_config(args.preset, {})
    train = {
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "grad_accum": 1,
        "compile": not args.no_compile,
        "activation_checkpointing": args.activation_checkpointing,
    }
    model_changes: dict[str, object] = {}
    if args.dry_run:
        args.steps, args.warmup, args.batch_size, args.seq_len = 3, 1, 2, 64
        train.update(batch_size=2, seq_len=64, compile=False, device="cpu", dtype="float32")
        model_changes = {"n_layer": 2, "d_model": 128, "n_head": 4, "d_ff": 256, "vocab_size": 512, "max_seq_len": 64}
        if cfg.model.n_kv_head:
            model_changes["n_kv_head"] = 2
    cfg = replace(cfg, model=model_changes, train=train)
    tc = cfg.train
    device = pick_device(tc.device)
    if device.type != "cuda" and not args.dry_run:
        raise SystemExit("no GPU here: run with --dry-run to check the script on CPU")
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg.model)
    forward = distributed.parallelize(model, tc, device, distributed.World())
    optimizer = make_optimizer(model, tc, device)
    autocast = autocast_for(device, tc.dtype)
    data = torch.randint(0, cfg.model.vocab_size, (4, tc.batch_size, tc.seq_len + 1), device=device)

    def step(i: int) -> torch.Tensor:
        optimizer.set_lr(lr_at(i, tc))
        b = data[i % len(data)]
        loss, _, _ = train_step(forward, model, optimizer, [(b[:, :-1], b[:, 1:])], tc, autocast, device)
        return loss

    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    loss.item()
    sync()
    seconds = time.perf_counter() - t
    tokens_per_s = args.steps * tc.batch_size * tc.seq_len / seconds
    flops_per_s = model.flops_per_token(tc.seq_len) * tokens_per_s
    peak = peak_flops(device)
    result = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "params": model.num_params(),
        "batch": f"{tc.batch_size}x{tc.seq_len}",
        "tokens_per_s": tokens_per_s,
        "tflops_per_s": flops_per_s / 1e12,
        "mfu": flops_per_s / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": loss.item(),
    }
    mfu = f"{result['mfu']:.1%}" if result["mfu"] is not None else "n/a (no peak for this device)"
    print(
        f"{args.preset} ({result['params'] / 1e6:,.0f}M params) on {result['device']}, batch {result['batch']}: "
        f"{tokens_per_s:,.0f} tok/s, {result['tflops_per_s']:.1f} TFLOP/s, MFU {mfu}"
    )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
