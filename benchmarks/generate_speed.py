"""Decode speed of nomoat's `generate_tokens` against Hugging Face `generate()` on identical weights, in one process.

CPU, fp32, batch 1, greedy. Two shapes with random weights: GPT-2 124M and a LLaMA-style ~120M (GQA, SwiGLU, RoPE).
Per shape: a token-identity check of the greedy outputs, decode and prefill tokens/s, peak resident memory against
weight bytes, and the memory-bandwidth limit of decoding. Not here: sampling, batching, quantized weights.
Usage: `python benchmarks/generate_speed.py [--shape both] [--prompt-tokens 32] [--new-tokens 256] [--json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from nomoat.config import ModelConfig, load_config
from nomoat.generate import generate_tokens
from nomoat.model import Transformer

SHAPES = {
    "gpt2": ModelConfig(),  # the defaults are GPT-2 124M
    "llama": load_config("llama-125m").model,
}

# One timed generation: (new token ids, wall time of the call start, wall time at which each new token arrived).
Timed = tuple[list[int], float, list[float]]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=(*SHAPES, "both"), default="both")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed generations per side; medians are over them")
    p.add_argument(
        "--compile",
        choices=("both", "eager", "compiled"),
        default="both",
        help="which nomoat decode paths to time (generate_tokens(compile=...)); compiling costs seconds once",
    )
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's choice")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


# --- memory ----------------------------------------------------------------------------------------------------


def rss_mib(field: str = "VmRSS") -> float:
    """Resident memory of this process from /proc/self/status: VmRSS now, or VmHWM, its peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Make VmHWM restart from the current RSS (Linux: writing 5 to clear_refs), so a peak belongs to one call."""
    Path("/proc/self/clear_refs").write_text("5")


@contextlib.contextmanager
def peak_rss_of_call() -> Iterator[list[float]]:
    """Yields a list that holds, after the block, the block's peak resident memory above the RSS it started at."""
    result = [0.0]
    before = rss_mib()
    reset_peak_rss()
    yield result
    result[0] = rss_mib("VmHWM") - before


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights are yielded once


def bytes_read_per_token(model: Transformer, prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
    """(weight bytes, mean KV-cache bytes) that one decode step must read from memory. Embedding tables that are
    only gathered from (input tokens when untied, learned positions) cost one row, so they are left out."""
    cfg = model.cfg
    gathered = model.embed_tokens.weight.numel() if not cfg.tie_embeddings else 0
    if cfg.pos_emb == "learned":
        gathered += model.embed_positions.weight.numel()
    weights = weight_bytes(model) - gathered * model.embed_tokens.weight.element_size()
    mean_len = prompt_tokens + new_tokens / 2
    kv = 2 * cfg.n_layer * cfg.kv_heads * cfg.dim_head * mean_len * model.embed_tokens.weight.element_size()
    return weights, int(kv)


def copy_bandwidth(mib: int = 512, repeats: int = 10) -> tuple[float, float]:
    """(copy, read) bandwidth in bytes/s, best of repeats over a tensor far larger than the caches (32 MiB L3 here).
    Copy counts read + write bytes (2x the tensor), not the extra read a write-allocate cache may do; read is a sum."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    n = src.numel() * src.element_size()
    copy, read = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy.append(2 * n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        src.sum()
        read.append(n / (time.perf_counter() - t0))
    return max(copy), max(read)


# --- Hugging Face twins ----------------------------------------------------------------------------------------


def hf_twin(model: Transformer) -> torch.nn.Module:
    """A Hugging Face model of the same shape holding nomoat's weights, through nomoat's own export key maps."""
    import transformers  # optional dependency, imported only here

    from nomoat.convert.hf import architecture_of, config_to_hf, weights_to_hf

    arch = architecture_of(model.cfg)
    hf_config = config_to_hf(model.cfg, arch)
    hf = getattr(transformers, arch)(transformers.AutoConfig.for_model(**hf_config))
    state = weights_to_hf(arch, model.cfg, model.state_dict())
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set()):
        raise SystemExit(f"key map incomplete: missing {missing}, unexpected {unexpected}")
    # Greedy to exactly n tokens: no end-of-sequence id, so no logits processor can touch the argmax.
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.eval()


# --- timed generation ------------------------------------------------------------------------------------------


def time_nomoat(model: Transformer, prompt: list[int], n: int, compile: bool) -> Timed:
    stamps: list[float] = []
    tokens: list[int] = []
    t0 = time.perf_counter()
    for token in generate_tokens(model, prompt, n, temperature=0, compile=compile):
        stamps.append(time.perf_counter())
        tokens.append(token)
    return tokens, t0, stamps


class _Stamps:
    """A `generate(streamer=...)` that notes when each new token arrives; HF first hands it the prompt."""

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if self.seen_prompt:
            self.stamps.append(time.perf_counter())
        self.seen_prompt = True

    def end(self) -> None:
        pass


@torch.no_grad()
def time_hf(hf: torch.nn.Module, prompt: list[int], n: int) -> Timed:
    idx = torch.tensor([prompt])
    streamer = _Stamps()
    t0 = time.perf_counter()
    out = hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        use_cache=True,
        streamer=streamer,
    )
    return out[0, len(prompt) :].tolist(), t0, streamer.stamps


def rates(timed: Timed, prompt_tokens: int) -> tuple[float, float]:
    """(decode tokens/s between the first and the last new token, prefill tokens/s from the time to first token)."""
    _, t0, stamps = timed
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), prompt_tokens / (stamps[0] - t0)


def bench_shape(name: str, args: argparse.Namespace, bandwidth: tuple[float, float]) -> dict:
    cfg = SHAPES[name]
    torch.manual_seed(args.seed)
    rss0 = rss_mib()
    model = Transformer(cfg).eval()
    ours_rss = rss_mib() - rss0
    rss0 = rss_mib()
    hf = hf_twin(model)
    hf_rss = rss_mib() - rss0
    wbytes = weight_bytes(model)
    prompt = torch.randint(cfg.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    n = args.new_tokens
    print(f"\n== {name}: {model.num_params() / 1e6:.1f}M parameters, {wbytes / 2**20:.0f} MiB of fp32 weights")

    with torch.no_grad():  # the twins must compute the same function before their speed is worth comparing
        idx = torch.tensor([prompt])
        diff = (model(idx) - hf(idx).logits).abs().max().item()
    print(f"logits max |nomoat - HF| on the prompt: {diff:.2e}")

    paths = {"eager": False, "compiled": True}
    wanted = list(paths) if args.compile == "both" else [args.compile]
    sides: dict[str, Callable[[], Timed]] = {
        f"nomoat_{p}": (lambda c=paths[p]: time_nomoat(model, prompt, n, c)) for p in wanted
    }
    sides["hf"] = lambda: time_hf(hf, prompt, n)

    first_call_s, first_peak_mib, tokens = {}, {}, {}
    for side, run in sides.items():  # the first call of each side is warmup; for compiled it holds the compile
        with peak_rss_of_call() as peak:
            t0 = time.perf_counter()
            tokens[side] = run()[0]
            first_call_s[side] = time.perf_counter() - t0
        first_peak_mib[side] = peak[0]
        print(f"warmup {side}: first generate call {first_call_s[side]:.1f}s", flush=True)
    same = {side: toks == tokens["hf"] for side, toks in tokens.items() if side != "hf"}
    for side, ok in same.items():
        first_diff = next((i for i, (a, b) in enumerate(zip(tokens[side], tokens["hf"], strict=True)) if a != b), None)
        print(f"check greedy {side} == hf: {'OK' if ok else f'MISMATCH at new token {first_diff}'} ({n} tokens)")

    decode: dict[str, list[float]] = {side: [] for side in sides}
    prefill: dict[str, list[float]] = {side: [] for side in sides}
    order = list(sides)
    peak_mib = {side: 0.0 for side in sides}
    for r in range(args.repeats):  # rotate who goes first, so a shared machine's slow spell hits every side alike
        for side in order[r % len(order) :] + order[: r % len(order)]:
            with peak_rss_of_call() as peak:
                timed = sides[side]()
            peak_mib[side] = max(peak_mib[side], peak[0])
            d, p = rates(timed, args.prompt_tokens)
            decode[side].append(d)
            prefill[side].append(p)
        print(f"repeat {r + 1}: " + ", ".join(f"{s} {v[-1]:.1f} tok/s" for s, v in decode.items()), flush=True)

    decode_med = {s: statistics.median(v) for s, v in decode.items()}
    prefill_med = {s: statistics.median(v) for s, v in prefill.items()}
    ratios = {
        f"{s}/hf": statistics.median(a / b for a, b in zip(v, decode["hf"], strict=True))
        for s, v in decode.items()
        if s != "hf"
    }
    wread, kvread = bytes_read_per_token(model, args.prompt_tokens, n)
    copy_bw, read_bw = bandwidth
    limit = {"copy": copy_bw / (wread + kvread), "read": read_bw / (wread + kvread)}  # tokens/s at full bandwidth

    print(f"{'side':>16} {'decode tok/s':>13} {'prefill tok/s':>14} {'model MiB':>10} {'call peak MiB':>14}")
    model_mib = {s: hf_rss if s == "hf" else ours_rss for s in sides}
    for s in sides:
        print(f"{s:>16} {decode_med[s]:>13.1f} {prefill_med[s]:>14.0f} {model_mib[s]:>10.0f} {peak_mib[s]:>14.0f}")
    for key, value in ratios.items():
        print(f"ratio decode {key}: {value:.2f}x (target >= 2x)")
    resident = {s: model_mib[s] + peak_mib[s] for s in sides}
    print(
        f"memory: weights {wbytes / 2**20:.0f} MiB. Model MiB is the RSS that building the model added; call peak "
        "is the most RSS a timed generate call added on top (KV cache, activations, workspace)."
    )
    for s in sides:
        print(f"{s}: model + call peak {resident[s]:.0f} MiB = {resident[s] * 2**20 / wbytes:.2f}x the weights")
    if "nomoat_compiled" in sides:
        print(f"nomoat_compiled: its first call (compiling) added {first_peak_mib['nomoat_compiled']:.0f} MiB")
    print(f"process peak {rss_mib('VmHWM'):.0f} MiB (holds both models and torch itself)")
    print(
        f"bandwidth limit: {(wread + kvread) / 2**20:.0f} MiB read per token ({wread / 2**20:.0f} weights + "
        f"{kvread / 2**20:.0f} mean KV) -> {limit['copy']:.1f} tok/s at copy bandwidth, "
        f"{limit['read']:.1f} tok/s at read bandwidth"
    )
    for s in sides:
        if s != "hf":
            print(
                f"{s}: {decode_med[s] / limit['copy']:.0%} of the copy-bandwidth limit (target >= 60%), "
                f"{decode_med[s] / limit['read']:.0%} of the read-bandwidth limit"
            )
    return {
        "params": model.num_params(),
        "weight_bytes": wbytes,
        "bytes_read_per_token": {"weights": wread, "kv_mean": kvread},
        "logits_max_abs_diff": diff,
        "greedy_identical": same,
        "decode_tokens_per_s": decode_med,
        "prefill_tokens_per_s": prefill_med,
        "decode_ratios": ratios,
        "first_call_s": first_call_s,
        "model_rss_mib": model_mib,
        "call_peak_rss_mib": peak_mib,
        "first_call_peak_rss_mib": first_peak_mib,
        "resident_over_weights": {s: resident[s] * 2**20 / wbytes for s in sides},
        "bandwidth_limit_tokens_per_s": limit,
        "fraction_of_limit": {s: {k: decode_med[s] / v for k, v in limit.items()} for s in sides if s != "hf"},
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, batch 1, greedy")
    print(f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.repeats} repeats")
    copy_bw, read_bw = copy_bandwidth()
    print(
        f"memory bandwidth: copy {copy_bw / 1e9:.1f} GB/s (read + write bytes counted), read {read_bw / 1e9:.1f} GB/s"
    )
    shapes = list(SHAPES) if args.shape == "both" else [args.shape]
    results = {name: bench_shape(name, args, (copy_bw, read_bw)) for name in shapes}
    if args.json:
        summary = {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
            "bandwidth_bytes_per_s": {"copy_read_plus_write": copy_bw, "read": read_bw},
            "shapes": results,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
