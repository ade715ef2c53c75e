"""DPO training step time and peak memory: nomoat vs TRL's DPOTrainer, same LLaMA-style model, LoRA rank 16.

Each side trains the same weights (the nomoat model exported through convert/hf.py's key maps) on the same
preference pairs, with the same LoRA targets and the same fused AdamW (nomoat.optim), in two modes: the reference
is the model with its adapters switched off (a second forward per step), or its log-probs were precomputed once.
nomoat's step is nomoat.train.train_step with dpo.DPOLoss, as `nomoat finetune --objective dpo` runs it; TRL's is
DPOTrainer.compute_loss on its own collated batch, then backward, clipping and the optimizer step. Memory is, on
CPU, the peak resident set size while training above what the process held just before the first step (sampled
every few milliseconds, in a process per side); on CUDA, torch.cuda.max_memory_allocated above the same point.

    python benchmarks/dpo.py                    # ~134M parameters (d_model 768, 12 layers), 4 pairs of 2 x 256
    python benchmarks/dpo.py --quick            # a tiny model: checks that every side runs, times mean nothing
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lora import TARGETS, PeakRSS, model_config, rss_bytes  # noqa: E402  (the LoRA benchmark's shape and meter)

from nomoat.config import ModelConfig, TrainConfig  # noqa: E402

SIDES = ("nomoat", "trl", "nomoat-precomputed", "trl-precomputed")
BETA = 0.1


def shape(quick: bool) -> ModelConfig:
    if not quick:
        return model_config()
    return ModelConfig(
        vocab_size=512, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=128, norm="rmsnorm",
        mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False, init="normal",
    )  # fmt: skip


def pairs_of(cfg: ModelConfig, batch: int, seq: int) -> list[tuple[list[int], list[int], list[int]]]:
    """batch pairs whose prompt fills half of each sequence and whose replies differ in length, as real ones do."""
    g = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    half = seq // 2
    return [(ids(half), ids(half), ids(half - 8 * (i % 4))) for i in range(batch)]


def build(side: str, cfg: ModelConfig, rank: int) -> torch.nn.Module:
    """The side's model with a LoRA adapter (A from seed 1, B zero as both libraries start it)."""
    from nomoat.model import Transformer

    torch.manual_seed(0)
    ours = Transformer(cfg)
    if side.startswith("nomoat"):
        from nomoat.lora import add_lora

        torch.manual_seed(1)
        add_lora(ours, rank, 2.0 * rank, 0.0, TARGETS)
        return ours
    from transformers import LlamaConfig, LlamaForCausalLM

    from nomoat.convert.hf import config_to_hf, weights_to_hf

    hf_cfg = config_to_hf(cfg, "LlamaForCausalLM")
    state = weights_to_hf("LlamaForCausalLM", cfg, dict(ours.state_dict()))
    hf = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in hf_cfg.items() if k != "architectures"}))
    hf.load_state_dict(state)
    return hf


def trl_trainer(hf: torch.nn.Module, rank: int, precompute: bool, device: torch.device, tmp: str) -> object:
    """A DPOTrainer over hf, its LoRA added by TRL; the one-pair dataset it requires is never trained on (the
    benchmark hands compute_loss its own batch), so a small tokenizer serves."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    from nomoat.tokenizer import train_tokenizer

    tok = train_tokenizer(["a small corpus for the tokenizer TRL requires"] * 4, 300)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok.hf, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    args = DPOConfig(
        output_dir=tmp, beta=BETA, precompute_ref_log_probs=precompute, max_length=None, report_to="none",
        use_cpu=device.type == "cpu", bf16=False, gradient_checkpointing=False, save_strategy="no", seed=1,
        per_device_train_batch_size=1,
    )  # fmt: skip
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(TARGETS))
    data = Dataset.from_list([{"prompt": "a", "chosen": " small", "rejected": " corpus"}])
    torch.manual_seed(1)
    return DPOTrainer(model=hf, args=args, train_dataset=data, processing_class=hf_tok, peft_config=lora)


def setup_side(side: str, cfg: ModelConfig, batch: int, seq: int, rank: int, device: torch.device) -> Callable:
    """One DPO training step of a side, as a closure over its model, optimizer and batch."""
    import tempfile

    from nomoat.dpo import DPOLoss, collate_pairs, precompute_reference, with_reference
    from nomoat.optim import make_optimizer
    from nomoat.train import train_step

    precompute = side.endswith("precomputed")
    pairs = pairs_of(cfg, batch, seq)
    tc = TrainConfig(batch_size=batch, seq_len=seq, lr=1e-4, grad_clip=1.0)
    model = build(side, cfg, rank).to(device)
    if side.startswith("nomoat"):
        if precompute:
            pairs = with_reference(pairs, precompute_reference(model, pairs, 0, batch, device))
        objective = DPOLoss(model, BETA, precomputed=precompute)
        optimizer = make_optimizer(model, tc, device)
        batches = [collate_pairs(pairs, 0)]
        model.train()
        step = lambda: train_step(model, model, optimizer, batches, tc, None, device, objective)  # noqa: E731
        step.model = model  # type: ignore[attr-defined]
        return step
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trainer = trl_trainer(model, rank, precompute, device, tempfile.mkdtemp())
    peft = trainer.model.to(device).train()
    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs]
    inputs = {k: v.to(device) for k, v in DataCollatorForPreference(pad_token_id=0)(examples).items()}
    if precompute:  # as TRL's precompute stores them with each row
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = trainer.compute_ref_log_probs(peft, inputs)
    optimizer = make_optimizer(peft, tc, device)
    params = [p for p in peft.parameters() if p.requires_grad]

    def step() -> None:
        trainer.compute_loss(peft, inputs).backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step.model = peft  # type: ignore[attr-defined]
    return step


def measure_memory(side: str, cfg: ModelConfig, batch: int, seq: int, rank: int, device: torch.device) -> dict:
    """Peak memory above the resident model and libraries over three steps, in a process of its own."""
    step = setup_side(side, cfg, batch, seq, rank, device)
    model = step.model  # type: ignore[attr-defined]
    info = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return {**info, "peak_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
    base = rss_bytes()
    with PeakRSS() as mem:
        for _ in range(3):
            step()
    return {**info, "peak_mib": (mem.peak - base) / 2**20}


def measure_time(sides: Sequence[str], cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict:
    """Fastest step time per side (other jobs on the machine only ever add time), the sides' steps interleaved
    so that a busy machine slows all of them alike."""
    runs = {side: setup_side(side, cfg, args.batch, args.seq, args.rank, device) for side in sides}
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(args.steps + 1):  # the first round warms up allocators and kernels and is not timed
        for side, step in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                times[side].append(time.perf_counter() - start)
    return {side: min(t) for side, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step (2x as many sequences)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence: prompt half, reply half")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the fastest is reported")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="memory runs per side; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny model, 2 pairs of 32 tokens, 1 repeat")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.repeats = 2, 32, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device, cfg = torch.device(args.device), shape(args.quick)
    if args.side:
        print(json.dumps(measure_memory(args.side, cfg, args.batch, args.seq, args.rank, device)))
        return
    results: dict[str, dict[str, float]] = {}
    for side in SIDES:  # the allocator makes one process's peak noisy: the median of a few
        cmd = [sys.executable, __file__, "--side", side, *sys.argv[1:]]
        outs = [subprocess.run(cmd, check=True, capture_output=True, text=True).stdout for _ in range(args.repeats)]
        runs = [json.loads(out.splitlines()[-1]) for out in outs]
        results[side] = {**runs[0], "peak_mib": statistics.median(r["peak_mib"] for r in runs)}
    for side, seconds in measure_time(SIDES, cfg, args, device).items():
        results[side]["step_s"] = seconds
    for side, r in results.items():
        print(
            f"{side:>18}: {r['step_s'] * 1000:8.0f} ms/step, peak +{r['peak_mib']:6.0f} MiB while training, "
            f"{r['trainable']:,} trainable"
        )
    from nomoat.device import cpu_description

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"{args.batch} pairs of 2 x {args.seq} tokens, LoRA rank {args.rank}, {where}")
    summary = {}
    for mode in ("", "-precomputed"):
        ours, trl = results[f"nomoat{mode}"], results[f"trl{mode}"]
        speed, memory = trl["step_s"] / ours["step_s"], ours["peak_mib"] / max(trl["peak_mib"], 1e-9)
        summary[f"speedup{mode}"], summary[f"memory_ratio{mode}"] = speed, memory
        label = "precomputed reference" if mode else "reference = adapters off"
        print(f"{label}: nomoat is {speed:.2f}x TRL's speed, with {memory:.2f}x its peak memory while training")
    print(json.dumps({**summary, "where": where, **results}))


if __name__ == "__main__":
    main()
