"""Sampling: a streaming token iterator over the KV cache, and a text iterator on top of it that ends at stop
strings (through tokenizer.decode_stream, as every command that streams text does).

Greedy (temperature 0), temperature, top-k and top-p (nucleus, arXiv:1904.09751), seeded for repeatability.
The model stays math-only; batching many requests and serving live in `serve/`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from nomoat.errors import UserError
from nomoat.model import KVCache, Transformer
from nomoat.packed import pack_linears
from nomoat.tokenizer import Tokenizer, decode_stream

GREEDY_BELOW = 1e-5  # temperatures under this are an argmax anyway, and dividing by them overflows float32


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Draw one token id from the logits (V,) of the last position.

    Temperatures too small for float32 to divide by are greedy, and top_p always keeps the likeliest token, so
    extreme settings never turn the distribution into NaN."""
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    logits = (logits.float() - logits.max()) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# Below this many new tokens, generate_tokens decodes eagerly unless the model's compiled step already exists:
# the compile (about 5 s for a 30-layer model with Inductor's disk cache warm, 7 s cold) would cost more than
# it saves (a 135M LLaMA decodes at about 19 tokens/s eager and 30 compiled on 2 cores).
AUTO_COMPILE_TOKENS = 64


class DecodeStep:
    """Compiled one-token steps over a KVCache, for every batch size and cache length.

    A decode step is a few matrix-vector products per block plus dozens of small ops, whose dispatch costs as much
    as the products on a CPU. So the projections are fused (Transformer.fuse: q/k/v and gate/up, 4 products a
    block instead of 7) and each block is compiled, the products staying MKL's (Inductor's own row products read
    the weights slower). Blocks never read their own index, so one compiled graph serves every block: the
    compile is one block's, not the model's. Cache length and batch are marked dynamic, so no request compiles
    again. The final norm and output head are compiled too (a quantized head then streams its int8 rows in one
    loop). Full-precision weights are packed for oneDNN (packed.py), which streams them about twice as fast as
    MKL for few rows, prefill included; without oneDNN they are kept column-major (Transformer.transpose_weights),
    which MKL streams faster for one row. Prefill (many tokens) stays eager, where the products dominate."""

    def __init__(self, model: Transformer) -> None:
        self.model = model.fuse()
        if not pack_linears(model):
            model.transpose_weights()
        self.blocks = [_batch_dynamic(torch.compile(block, dynamic=False)) for block in model.layers]
        self.head = _batch_dynamic(torch.compile(_head(model), dynamic=False))

    def __call__(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        for t in (*cache.k, *cache.v):  # cheap (an attribute on the tensor): lengths and batch sizes vary
            torch._dynamo.maybe_mark_dynamic(t, 0)
            torch._dynamo.maybe_mark_dynamic(t, 2)
        return self.model(idx, cache=cache, blocks=self.blocks, head=self.head)


def _head(model: Transformer) -> Callable[[torch.Tensor], torch.Tensor]:
    def head(x: torch.Tensor) -> torch.Tensor:
        return model.lm_head(model.norm(x))

    return head


def _batch_dynamic(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """fn (a block, or the head), called with its inputs' batch marked dynamic: one graph for every batch of more
    than one row."""

    def call(x: torch.Tensor, *args: Any) -> Any:
        for t in (x, *_tensors(args)):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return fn(x, *args)

    return call


def _tensors(args: Sequence[Any]) -> Iterator[torch.Tensor]:
    """A block's batch-led tensor arguments: the rope tables and positions (not the cache, marked per step)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, tuple):
            yield from a


_STEPS: weakref.WeakKeyDictionary[Transformer, DecodeStep] = weakref.WeakKeyDictionary()


def decode_step(model: Transformer) -> DecodeStep:
    """The model's compiled step, made once per model and process."""
    if model not in _STEPS:
        _STEPS[model] = DecodeStep(model)
    return _STEPS[model]


@torch.no_grad()
def generate_tokens(
    model: Transformer,
    prompt: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    compile: bool | None = None,
    stats: dict[str, float] | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time; stops at eos_id (not yielded), max_new_tokens or a full context.

    compile runs the decode steps through DecodeStep (seconds of compiling, once per model and process); None
    does when the model's step exists already or at least AUTO_COMPILE_TOKENS are asked for. The prompt is
    always run eagerly. stats, if given, is filled as tokens come: prefill_seconds, first_token_seconds,
    decode_seconds and decode_steps (model time only, not the consumer's), compile_seconds (the first
    compiled step of a process, kept out of the decode rate), and, once the tokens run out, finish: "eos",
    "length" (max_new_tokens) or "context" (the context filled before max_new_tokens).
    """
    _check(model, prompt, max_new_tokens)
    max_len = model.cfg.max_seq_len
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(prompt), decode_seconds=0.0, decode_steps=0, compile_seconds=0.0)
    start = time.perf_counter()
    device = model.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    model.eval()
    n_new = min(max_new_tokens, max_len - len(prompt))
    cache = KVCache(model.cfg, 1, len(prompt) + n_new, device=device, dtype=model.dtype)
    last = torch.tensor([len(prompt) - 1], device=device)  # only the last position's logits are wanted
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache, logits_at=last)[0, -1]
    stats["prefill_seconds"] = time.perf_counter() - start
    if compile is None:
        compile = model in _STEPS or max_new_tokens >= AUTO_COMPILE_TOKENS
    compiling = compile and n_new > 1 and model not in _STEPS
    step = decode_step(model) if compile and n_new > 1 else model
    for i in range(n_new):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        stats.setdefault("first_token_seconds", time.perf_counter() - start)
        if token == eos_id:
            stats["finish"] = "eos"
            return
        yield token
        if i + 1 < n_new:
            t = time.perf_counter()
            logits = step(torch.tensor([[token]], device=device), cache)[0, -1]
            if compiling:
                stats["compile_seconds"], compiling = time.perf_counter() - t, False
            else:
                stats["decode_seconds"] += time.perf_counter() - t
                stats["decode_steps"] += 1
    stats["finish"] = "context" if n_new < max_new_tokens else "length"


@torch.no_grad()
def warm_up(model: Transformer) -> float:
    """Compile the model's batch-1 decode step now, once per process; returns the seconds it took (chat runs it
    while the user types the first message)."""
    start = time.perf_counter()
    cache = KVCache(model.cfg, 1, 2, device=model.device, dtype=model.dtype)
    decode_step(model.eval())(torch.zeros((1, 1), dtype=torch.long, device=model.device), cache)
    return time.perf_counter() - start


class PromptTooLong(UserError):
    """A prompt that leaves no room to generate: a chat catches it to go on (a shorter message, /reset)."""

    def __init__(self, tokens: int, context: int) -> None:
        super().__init__(f"the prompt has {tokens} tokens; the model's context is {context}")
        self.tokens, self.context = tokens, context


def _check(model: Transformer, prompt: Sequence[int], max_new_tokens: int) -> None:
    max_len = model.cfg.max_seq_len
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    if len(prompt) >= max_len:
        raise PromptTooLong(len(prompt), max_len)
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")


def speeds(stats: dict[str, float]) -> dict[str, float | None]:
    """generate_tokens' stats as the rates `generate --json` reports (None where there was nothing to time)."""
    prefill, steps, decode = stats.get("prefill_seconds"), stats.get("decode_steps", 0), stats.get("decode_seconds")
    return {
        "prefill_tokens_per_s": stats["prompt_tokens"] / prefill if prefill else None,
        "decode_tokens_per_s": steps / decode if steps and decode else None,
        "first_token_seconds": stats.get("first_token_seconds"),
        "compile_seconds": stats.get("compile_seconds", 0.0),
    }


def generate_text(
    model: Transformer, tokenizer: Tokenizer, prompt: str, stop: Sequence[str] = (), **kwargs
) -> Iterator[str]:
    """Stream decoded text pieces for a prompt, ending before the first stop string (not shown); kwargs as for
    generate_tokens."""
    ids = tokenizer.encode(prompt)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    yield from decode_stream(tokenizer, generate_tokens(model, ids, **kwargs), stop)
