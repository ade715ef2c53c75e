"""Data-parallel scaling on this machine: tokens/s of 1 process vs N processes (torchrun, gloo, DDP or FSDP2).

The communication share is measured, not guessed: each rank also times the same steps on its own unwrapped
model while the other ranks do the same, so compute contention is identical and the difference is the exposed
all-reduce time. Every run goes through nomoat.train.train_step and nomoat.distributed, as training does.

    python benchmarks/scaling_cpu.py                 # 1 vs 2 processes, DDP
    python benchmarks/scaling_cpu.py --parallel fsdp
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from nomoat import distributed
from nomoat.config import ModelConfig, TrainConfig
from nomoat.model import Transformer
from nomoat.optim import make_optimizer
from nomoat.train import train_step


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def setup(args: argparse.Namespace, nproc: int) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(
        vocab_size=8192,
        n_layer=args.layers,
        n_head=args.width // 64,
        d_model=args.width,
        d_ff=4 * args.width,
        max_seq_len=args.seq_len,
    )
    # the global batch is the same for every world size: nproc micro-batches per optimizer step
    train = TrainConfig(batch_size=args.batch_size, grad_accum=nproc, seq_len=args.seq_len, parallel=args.parallel)
    return model, train


def time_steps(
    args: argparse.Namespace, mc: ModelConfig, tc: TrainConfig, world: distributed.World, wrap: bool
) -> float:
    """Seconds per optimizer step, median over args.steps after args.warmup."""
    torch.manual_seed(0)
    model = Transformer(mc)
    forward = distributed.parallelize(model, tc, torch.device("cpu"), world) if wrap else model
    optimizer = make_optimizer(model, tc, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, mc.vocab_size, (tc.grad_accum, tc.batch_size, tc.seq_len + 1), generator=g)
    batches = iter([(b[:, :-1], b[:, 1:]) for b in data] * (args.steps + args.warmup))
    share = world.size if wrap else 1
    times = []
    for i in range(args.steps + args.warmup):
        mine = distributed.micro_batches(batches, tc.grad_accum, distributed.World(world.rank % share, share))
        distributed.barrier(world)
        t = time.perf_counter()
        train_step(forward, model, optimizer, mine, tc, None, torch.device("cpu"))
        distributed.barrier(world)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def worker(args: argparse.Namespace) -> None:
    world = distributed.init(torch.device("cpu"))
    mc, tc = setup(args, world.size)
    local = time_steps(args, mc, tc, world, wrap=False)  # each rank a full global batch alone: compute only
    wrapped = time_steps(args, mc, tc, world, wrap=True)
    if world.main:
        compute = local / world.size  # a rank's share of that compute
        print(json.dumps({"step_s": wrapped, "compute_s": compute}))
    distributed.shutdown()


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(os.cpu_count() or 1)
    mc, tc = setup(args, 1)
    tc1 = TrainConfig(batch_size=args.batch_size, grad_accum=args.nproc, seq_len=args.seq_len)
    one = time_steps(args, mc, tc1, distributed.World(), wrap=False)
    tokens_per_step = args.batch_size * args.seq_len * args.nproc
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd += [__file__, "--worker", *sys.argv[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.nproc))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    many = json.loads(done.stdout.strip().splitlines()[-1])
    comm_share = max(0.0, 1 - many["compute_s"] / many["step_s"])
    result = {
        "model": f"L={mc.n_layer} C={mc.d_model} T={args.seq_len}, global batch {args.nproc}x{args.batch_size}",
        "tokens_per_s_1": tokens_per_step / one,
        f"tokens_per_s_{args.nproc}": tokens_per_step / many["step_s"],
        "speedup": one / many["step_s"],
        "communication_share": comm_share,
        "parallel": args.parallel,
    }
    print(f"{result['model']} on {os.cpu_count()} cores, {args.parallel}")
    print(f"1 process:   {result['tokens_per_s_1']:9,.0f} tok/s")
    print(f"{args.nproc} processes: {result[f'tokens_per_s_{args.nproc}']:9,.0f} tok/s  ({result['speedup']:.2f}x)")
    print(f"communication: {comm_share:.0%} of the {args.nproc}-process step time")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
