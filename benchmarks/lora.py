"""LoRA training step time and peak memory: nomoat vs transformers + PEFT, same LLaMA-style model, CPU.

Each side runs in its own process on the same weights (the nomoat model exported through convert/hf.py's key
maps), the same batch, rank and targets, and the same fused AdamW. Memory is the peak resident set size while
training, sampled every few milliseconds, above what the process held just before the first step (the weights,
the libraries); a third process runs nomoat's LoRA over the frozen 4-bit NF4 base and reports what it saves.

    python benchmarks/lora.py                         # ~134M parameters (d_model 768, 12 layers), batch 4 x 256
    python benchmarks/lora.py --batch 1 --seq 128 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

import torch

from nomoat.config import ModelConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def model_config() -> ModelConfig:
    return ModelConfig(
        vocab_size=32000, n_layer=12, n_head=12, d_model=768, d_ff=2048, max_seq_len=1024, norm="rmsnorm",
        mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False, init="normal",
    )  # fmt: skip


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The largest resident set size seen while the block runs, sampled by a thread."""

    def __enter__(self) -> PeakRSS:
        self.peak, self.done = rss_bytes(), False
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self.done:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.done = True
        self.thread.join()


def build(side: str, rank: int) -> tuple[torch.nn.Module, object]:
    """(module to train, forward returning logits) for one side, from the same seeded weights."""
    from nomoat.model import Transformer

    torch.manual_seed(0)
    ours = Transformer(model_config())
    if side in ("nomoat", "nomoat-nf4"):
        from nomoat.lora import add_lora
        from nomoat.quant import quantize_model

        if side == "nomoat-nf4":
            quantize_model(ours)
        torch.manual_seed(1)
        add_lora(ours, rank, 2.0 * rank, 0.0, TARGETS)
        return ours, ours
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from nomoat.convert.hf import config_to_hf, weights_to_hf

    cfg = model_config()
    hf_cfg = config_to_hf(cfg, "LlamaForCausalLM")
    state = weights_to_hf("LlamaForCausalLM", cfg, dict(ours.state_dict()))
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"}))
    hf.load_state_dict(state)
    del ours, state
    torch.manual_seed(1)
    peft = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS)))
    return peft, lambda x: peft(input_ids=x).logits


def resident_model_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def setup_side(side: str, batch: int, seq: int, rank: int) -> Callable[[], None]:
    """One training step of a side, as a closure over its model, optimizer and batch."""
    from nomoat.config import TrainConfig
    from nomoat.optim import make_optimizer
    from nomoat.train import train_step

    model, forward = build(side, rank)
    model.train()
    tc = TrainConfig(batch_size=batch, seq_len=seq, lr=1e-4, grad_clip=1.0)
    optimizer = make_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, 32000, (batch, seq + 1), generator=torch.Generator().manual_seed(2))
    batches = [(x[:, :-1], x[:, 1:])]
    step = lambda: train_step(forward, model, optimizer, batches, tc, None, torch.device("cpu"))  # noqa: E731
    step.model = model  # type: ignore[attr-defined]
    return step


def measure_memory(side: str, batch: int, seq: int, rank: int) -> dict[str, float]:
    """Peak RSS above the resident model and libraries over three steps, in a process of its own."""
    step = setup_side(side, batch, seq, rank)
    base = rss_bytes()
    with PeakRSS() as mem:
        for _ in range(3):
            step()
    model = step.model  # type: ignore[attr-defined]
    return {
        "peak_mib": (mem.peak - base) / 2**20,
        "model_mib": resident_model_bytes(model) / 2**20,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def measure_time(sides: Sequence[str], batch: int, seq: int, steps: int, rank: int) -> dict[str, float]:
    """Fastest step time per side (other jobs on the machine only ever add time), the sides' steps interleaved
    so that a busy machine slows all of them alike."""
    runs = {side: setup_side(side, batch, seq, rank) for side in sides}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(steps + 1):  # the first round warms up allocators and kernels and is not timed
        for side, step in runs.items():
            start = time.perf_counter()
            step()
            if i:
                times[side].append(time.perf_counter() - start)
    return {side: min(t) for side, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the fastest is reported")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="memory runs per side; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.side:
        print(json.dumps(measure_memory(args.side, args.batch, args.seq, args.rank)))
        return
    sides = ("nomoat", "peft", "nomoat-nf4")
    results: dict[str, dict[str, float]] = {}
    for side in sides:  # the allocator makes one process's peak noisy: the median of a few
        cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        outs = [subprocess.run(cmd, check=True, capture_output=True, text=True).stdout for _ in range(args.repeats)]
        runs = [json.loads(out.splitlines()[-1]) for out in outs]
        results[side] = {**runs[0], "peak_mib": statistics.median(r["peak_mib"] for r in runs)}
    for side, seconds in measure_time(sides, args.batch, args.seq, args.steps, args.rank).items():
        results[side]["step_s"] = seconds
    for side, r in results.items():
        print(
            f"{side:>11}: {r['step_s'] * 1000:8.0f} ms/step, peak +{r['peak_mib']:6.0f} MiB while training, "
            f"model {r['model_mib']:5.0f} MiB, {r['trainable']:,} trainable"
        )
    ours, peft, nf4 = results["nomoat"], results["peft"], results["nomoat-nf4"]
    print(f"batch {args.batch} x {args.seq} tokens, rank {args.rank}, {torch.get_num_threads()} threads")
    print(f"speed: nomoat is {peft['step_s'] / ours['step_s']:.2f}x transformers + peft (target >= 1.3x)")
    print(f"memory while training: nomoat {ours['peak_mib']:.0f} MiB vs peft {peft['peak_mib']:.0f} MiB")
    print(
        f"4-bit base: model {nf4['model_mib']:.0f} MiB vs {ours['model_mib']:.0f} MiB "
        f"({1 - nf4['model_mib'] / ours['model_mib']:.0%} less), step {nf4['step_s'] / ours['step_s']:.2f}x the time"
    )
    print(json.dumps({"speedup": peft["step_s"] / ours["step_s"], **results}))


if __name__ == "__main__":
    main()
