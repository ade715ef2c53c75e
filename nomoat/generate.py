"""Sampling: a streaming token iterator over the KV cache, and a text iterator on top of it that ends at stop
strings (through tokenizer.decode_stream, as every command that streams text does).

Greedy (temperature 0), temperature, top-k and top-p (nucleus, arXiv:1904.09751), seeded for repeatability.
The model stays math-only; batching many requests and serving live in `serve/`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from nomoat.errors import UserError
from nomoat.model import KVCache, Transformer
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


# Decoding one token multiplies a single row by every weight matrix, so it is bound by reading the weights. On CPU
# the BLAS call behind nn.Linear streams them at a fraction of memory bandwidth when there is one row, while
# Inductor's fused multiply-and-sum reads them near full bandwidth: the compiled CPU step rewrites those products.
def _row_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (1, n) @ b (n, m) as a multiply-and-sum over n; other shapes keep the matmul kernel."""
    if a.size(0) != 1:
        return NotImplemented
    return (a.t() * b).sum(0, keepdim=True)


def _row_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1, alpha: float = 1) -> torch.Tensor:
    if a.size(0) != 1 or beta != 1 or alpha != 1:
        return NotImplemented
    return bias + (a.t() * b).sum(0, keepdim=True)


def _inductor_with_row_products(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable:
    from torch._inductor.compile_fx import compile_fx  # the default backend, given two more decompositions
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    decompositions = {**select_decomp_table(), aten.mm.default: _row_mm, aten.addmm.default: _row_addmm}
    return compile_fx(gm, example_inputs, decompositions=decompositions)


def decode_step(model: Transformer) -> Callable[[torch.Tensor, KVCache], torch.Tensor]:
    """The model compiled for one-token steps over a KVCache."""
    on_cpu = model.embed_tokens.weight.device.type == "cpu"
    return torch.compile(model, backend=_inductor_with_row_products if on_cpu else "inductor")


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
    compile: bool = False,
) -> Iterator[int]:
    """Yield new token ids one at a time; stops at eos_id (not yielded), max_new_tokens or a full context.

    compile runs the one-token decode step through `torch.compile`: seconds of compiling on the first call
    (and on a new cache length), then faster steps. The prompt is always run eagerly.
    """
    max_len = model.cfg.max_seq_len
    if not prompt:
        raise UserError("the prompt is empty: give at least one token")
    if len(prompt) >= max_len:
        raise UserError(f"the prompt has {len(prompt)} tokens; the model's context is {max_len}")
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be 0 or more, got {max_new_tokens}")
    device = model.embed_tokens.weight.device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    model.eval()
    n_new = min(max_new_tokens, max_len - len(prompt))
    cache = KVCache(model.cfg, 1, len(prompt) + n_new, device=device, dtype=model.embed_tokens.weight.dtype)
    logits = model(torch.tensor([list(prompt)], device=device), cache=cache)[0, -1]
    step = decode_step(model) if compile else model
    for i in range(n_new):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        if token == eos_id:
            return
        yield token
        if i + 1 < n_new:
            logits = step(torch.tensor([[token]], device=device), cache)[0, -1]


def generate_text(
    model: Transformer, tokenizer: Tokenizer, prompt: str, stop: Sequence[str] = (), **kwargs
) -> Iterator[str]:
    """Stream decoded text pieces for a prompt, ending before the first stop string (not shown); kwargs as for
    generate_tokens."""
    ids = tokenizer.encode(prompt)
    kwargs.setdefault("eos_id", tokenizer.eos_id)
    yield from decode_stream(tokenizer, generate_tokens(model, ids, **kwargs), stop)
