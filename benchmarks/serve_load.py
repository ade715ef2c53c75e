"""Serving under load: aggregate generated tokens/s and time to first token with 1, 4 and 16 concurrent clients.

The server (`nomoat serve`'s app, in a child process so that clients do not share its interpreter) holds a
LLaMA-style ~120M model with random weights, as in generate_speed.py; the clients are the official `openai` async
client streaming /v1/completions. Prints the ratio of 16-client to 1-client throughput, which continuous batching
should lift well above 1 on a CPU (target: >= 4x, with p99 time to first token under 1 s). Not here: a peer server.
Usage: `python benchmarks/serve_load.py [--clients 1 4 16] [--prompt-tokens 32] [--max-tokens 64] [--json]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"
MODEL = "llama-120m-random"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--n-layer", type=int, default=12, help="fewer layers for a quick look on a slow machine")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def build_tokenizer(vocab_size: int):
    """BPE trained on the bundled Shakespeare, padded with placeholder tokens up to the model's vocabulary, so
    that every id the random model samples decodes to text (and so reaches the client as a streamed chunk)."""
    from nomoat.tokenizer import train_tokenizer

    tok = train_tokenizer([SHAKESPEARE.read_text()], vocab_size)
    tok.hf.add_tokens([f"<x{i}>" for i in range(vocab_size - tok.vocab_size)])
    return tok


def serve_random_model(port: int, n_layer: int, max_batch: int, seed: int) -> None:
    """The child process: a seeded random ~120M LLaMA-style model behind the nomoat app on 127.0.0.1:port."""
    import torch
    import uvicorn

    from nomoat.config import load_config
    from nomoat.model import Transformer
    from nomoat.serve.app import ServeConfig, build_app

    cfg = dataclasses.replace(load_config("llama-125m").model, n_layer=n_layer)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    print(f"server: {model.num_params() / 1e6:.0f}M parameters, {torch.get_num_threads()} threads", flush=True)
    app = build_app(model, build_tokenizer(cfg.vocab_size), MODEL, ServeConfig(max_batch=max_batch, max_queue=256))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


@dataclass
class Result:
    ttft: float  # seconds from sending the request to its first text chunk
    tokens: int  # completion tokens, from the usage chunk


async def one_request(client, prompt: str, max_tokens: int) -> Result:
    start = time.perf_counter()
    ttft, tokens = None, 0
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.8,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert ttft is not None, "the stream carried no text"
    return Result(ttft, tokens)


async def load(client, clients: int, per_client: int, prompts: list[str], max_tokens: int) -> dict:
    """`clients` concurrent loops, each sending per_client requests one after another."""

    async def loop(c: int) -> list[Result]:
        return [
            await one_request(client, prompts[(c * per_client + r) % len(prompts)], max_tokens)
            for r in range(per_client)
        ]

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(loop(c) for c in range(clients))) for r in rs]
    seconds = time.perf_counter() - start
    ttfts = sorted(r.ttft for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": sum(r.tokens for r in results),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(sum(r.tokens for r in results) / seconds, 1),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))], 3),
    }


async def measure(url: str, levels: list[int], per_client: int, prompts: list[str], max_tokens: int) -> list[dict]:
    import openai

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600) as client:
        await load(client, 1, 1, prompts, 8)  # warm-up: first-call allocations
        return [await load(client, c, per_client, prompts, max_tokens) for c in levels]


def wait_for(url: str, process: multiprocessing.Process, timeout: float = 300) -> None:
    import urllib.request

    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if not process.is_alive():
            raise RuntimeError("the server process died")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not come up")


def main() -> None:
    args = parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = multiprocessing.get_context("spawn").Process(
        target=serve_random_model, args=(port, args.n_layer, args.max_batch, args.seed), daemon=True
    )
    server.start()
    try:
        wait_for(url, server)
        tok = build_tokenizer(32000)
        ids = tok.encode(SHAKESPEARE.read_text()[:200_000])
        step = args.prompt_tokens
        prompts = [tok.decode(ids[i : i + step]) for i in range(0, step * 64, step)]  # 64 different prompts
        rows = asyncio.run(measure(url, args.clients, args.requests_per_client, prompts, args.max_tokens))
    finally:
        server.terminate()
        server.join()
    header = ("clients", "requests", "tokens", "seconds", "tokens/s", "TTFT p50", "TTFT p99")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (7, 8, 7, 8, 9, 9, 9), strict=True)))
    for r in rows:
        print(
            f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['ttft_p50_s']:>8.3f}s {r['ttft_p99_s']:>8.3f}s"
        )
    base, top = rows[0], rows[-1]
    ratio = top["tokens_per_s"] / base["tokens_per_s"]
    print(
        f"{top['clients']} clients vs {base['clients']}: {ratio:.2f}x the throughput "
        f"(target >= 4x), p99 time to first token {top['ttft_p99_s']:.3f} s (target < 1 s)"
    )
    if args.json:
        print(json.dumps({"n_layer": args.n_layer, "rows": rows, "ratio": round(ratio, 2)}))


if __name__ == "__main__":
    main()
