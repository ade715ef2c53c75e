"""CPU inference against llama.cpp on the same machine and threads: decode, prefill, first token, serving, start-up,
quality and memory of the weights, per precision (nomoat fp32/int8/int4 against llama.cpp's F32/Q8_0/Q4_0).

Models: a SmolLM2-135M-shaped LLaMA and GPT-2 124M with random weights (or `--model PATH`, a trained one). The
GGUF files are nomoat's own export (`nomoat convert to-gguf --type f32`) quantized by `llama-quantize`. llama.cpp
is timed by `llama-bench` (pp32, pp128, tg64) and `llama-server`; nomoat by `generate_tokens` with its default
settings (greedy, timed after one warm-up generation; the compile is start-up) and `nomoat serve`. Each nomoat
measurement runs in a fresh process, so memory and start-up are its own. Ratios are nomoat / llama.cpp (for
times llama.cpp / nomoat): >1 means nomoat is better. llama.cpp's first token is its pp32 time; its tg64 decodes
from an empty context, nomoat's after the prompt. Memory is the resident growth of loading with every weight read.
Needs llama.cpp (`bash scripts/llamacpp.sh`, built once).
Usage: `python benchmarks/cpu_inference.py [--shape smollm|gpt2|both] [--threads N] [--skip-serve] [--json]`,
`--n-layer 2 --eval-bytes 2048` for a quick check, `--model PATH` for a real checkpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEXT = next(p for p in (ROOT.parent / "shared/data/tinyshakespeare.txt", ROOT / "nomoat/assets/tinyshakespeare.txt")
            if p.is_file())  # fmt: skip
HELD_OUT = 0.9  # the last 10% of the text is held out (nanoGPT's split); the tokenizer learns from the rest
# nomoat's precision: (llama.cpp's GGUF type, load_model's quantize)
PRECISIONS = {"fp32": ("F32", None), "int8": ("Q8_0", "int8"), "int4": ("Q4_0", "int4")}
STARTED = time.perf_counter()
SLOT_CONTEXT = 256  # tokens per served sequence, on both servers (32 prompt + 64 new fit)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=("smollm", "gpt2", "both"), default="both")
    p.add_argument("--model", help="a trained MODEL (any path nomoat loads) instead of random weights")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both sides (default: all)")
    p.add_argument("--n-layer", type=int, help="fewer layers, for a quick check")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--prefill-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (medians), llama-bench's -r")
    p.add_argument("--eval-bytes", type=int, default=8192, help="held-out text scored for bits per byte")
    p.add_argument("--skip-serve", action="store_true")
    p.add_argument("--serve-precisions", nargs="+", choices=("fp32", "int8"), default=["fp32", "int8"])
    p.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new interpreter (spawned, so nothing of this one's memory comes along)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:4.0f} s] {message}", file=sys.stderr, flush=True)


def held_out_text() -> tuple[str, str]:
    """(training part, held-out part) of the text."""
    text = TEXT.read_text()
    cut = int(len(text) * HELD_OUT)
    return text[:cut], text[cut:]


# --- the models ------------------------------------------------------------------------------------------------


def make_random_model(shape: str, n_layer: int | None, out: Path) -> dict:
    """A Hugging Face folder with random weights in the shape (runs in a fresh process); returns its description.

    The tokenizer is a BPE trained on the text, padded with placeholder tokens up to the model's vocabulary, so
    that every id a random model samples decodes to text (and reaches a streaming client as a chunk)."""
    import dataclasses

    import torch

    from nomoat.checkpoint import Checkpoint
    from nomoat.config import ModelConfig, RunConfig, TrainConfig
    from nomoat.convert import to_hf
    from nomoat.model import Transformer
    from nomoat.tokenizer import train_tokenizer

    cfg = ModelConfig()  # GPT-2 124M
    if shape == "smollm":
        cfg = ModelConfig(
            vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536, max_seq_len=2048,
            norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=True, init="normal",
            rope_theta=100000.0,
        )  # fmt: skip
    cfg = dataclasses.replace(cfg, n_layer=n_layer or cfg.n_layer)
    tok = train_tokenizer([held_out_text()[0]], 8192)
    tok.hf.add_tokens([f"<x{i}>" for i in range(cfg.vocab_size - tok.vocab_size)])
    torch.manual_seed(0)
    model = Transformer(cfg)
    to_hf(Checkpoint(out, RunConfig(model=cfg, train=TrainConfig()), model, tok, None), out)
    return {"shape": shape, "n_layer": cfg.n_layer, "params_m": round(model.num_params() / 1e6, 1)}


def prompt_ids(model: str, n: int) -> list[int]:
    """The first n tokens of the held-out text, in the model's tokenizer (runs in a fresh process)."""
    from nomoat.load import load_model

    ids = load_model(model, device="meta").tokenizer.encode(held_out_text()[1])
    if len(ids) < n:
        raise ValueError(f"the held-out text has {len(ids)} tokens, fewer than the {n} needed")
    return ids[:n]


# --- llama.cpp -------------------------------------------------------------------------------------------------


def llama_bin() -> Path:
    found = subprocess.run(["bash", str(ROOT / "scripts/llamacpp.sh")], capture_output=True, text=True)
    if found.returncode != 0:
        sys.exit(f"llama.cpp is needed (scripts/llamacpp.sh failed): {found.stderr.strip()[-500:]}")
    return Path(found.stdout.strip().splitlines()[-1])


def export_ggufs(model: str, folder: Path, bin_dir: Path) -> tuple[dict[str, Path], float]:
    """nomoat's F32 export, quantized by llama.cpp to Q8_0 and Q4_0; also the export's seconds."""
    files = {name: folder / f"{gguf_type}.gguf" for name, (gguf_type, _) in PRECISIONS.items()}
    start = time.perf_counter()
    run([sys.executable, "-m", "nomoat", "convert", "to-gguf", model, str(files["fp32"]), "--type", "f32"])
    seconds = time.perf_counter() - start
    for name, (gguf_type, _) in PRECISIONS.items():
        if name != "fp32":
            run([str(bin_dir / "llama-quantize"), str(files["fp32"]), str(files[name]), gguf_type])
    return files, seconds


def run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-2000:]}")
    return out.stdout


def llama_bench(bin_dir: Path, gguf: Path, args: argparse.Namespace) -> dict:
    """llama-bench's prefill (pp32, pp128) and decode (tg64) tokens/s for one file, with its build commit."""
    prompts = f"{args.prompt_tokens},{args.prefill_tokens}"
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", prompts, "-n", str(args.new_tokens),
           "-t", str(args.threads), "-r", str(args.repeats), "-o", "json"]  # fmt: skip
    rows = json.loads(run(cmd))
    by_test = {(r["n_prompt"], r["n_gen"]): r for r in rows}
    first = by_test[(args.prompt_tokens, 0)]["avg_ts"]
    return {
        "decode_tokens_per_s": by_test[(0, args.new_tokens)]["avg_ts"],
        "prefill_tokens_per_s": by_test[(args.prefill_tokens, 0)]["avg_ts"],
        "first_token_seconds": args.prompt_tokens / first,  # the prompt's prefill, which yields the first logits
        "build": f"{rows[0]['build_number']} ({rows[0]['build_commit']})",
        "cpu_info": rows[0].get("cpu_info", ""),
        "file_mib": gguf.stat().st_size / 2**20,
    }


# --- nomoat, in a fresh process per precision ------------------------------------------------------------------


def resident_mib() -> dict[str, float]:
    """This process's resident memory, in all and split into anonymous and file-backed (mapped files) pages."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file"}
    status = (line.split() for line in Path("/proc/self/status").read_text().splitlines())
    return {fields[f[0][:-1]]: int(f[1]) / 1024 for f in status if f and f[0][:-1] in fields}


def tensor_mib(model: Any) -> float:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    tensors = {t.untyped_storage().data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.untyped_storage().nbytes() for t in tensors.values()) / 2**20


def load_measured(model: str, quantize: str | None) -> tuple[Any, dict]:
    """load_model, with its seconds and the resident growth it leaves once every weight has been read.

    The baseline follows a load on the meta device, so that modules imported on the first load are not counted;
    weights are summed after loading because safetensors are memory-mapped (resident only once read, as any
    forward pass reads them); freed heap is handed back to the system first, as a long-running server's is."""
    import ctypes
    import gc

    import torch

    from nomoat.load import load_model

    load_model(model, device="meta")
    before = resident_mib()
    start = time.perf_counter()
    ckpt = load_model(model, quantize=quantize)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        for t in (*ckpt.model.parameters(), *ckpt.model.buffers()):
            t.float().sum()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after = resident_mib()
    growth = {f"{k}_growth_mib": after[k] - before[k] for k in after}
    return ckpt, {"load_seconds": seconds, **growth, "tensor_mib": tensor_mib(ckpt.model)}


def nomoat_side(model: str, quantize: str | None, ids: list[int], args: argparse.Namespace, ref: Path) -> dict:
    """Every nomoat figure of one precision; runs in a fresh process. ref holds fp32's logits (written by fp32)."""
    import torch

    from nomoat.generate import generate_tokens, speeds

    torch.set_num_threads(args.threads)
    ckpt, figures = load_measured(model, quantize)
    prompt, long_prompt = ids[: args.prompt_tokens], ids[: args.prefill_tokens]

    def generate(prompt: list[int], new_tokens: int) -> dict:
        stats: dict = {}
        tokens = list(generate_tokens(ckpt.model, prompt, new_tokens, temperature=0.0, stats=stats))
        return {**speeds(stats), "tokens": tokens}

    figures["compile_seconds"] = generate(prompt, args.new_tokens)["compile_seconds"]  # the warm-up
    figures["startup_seconds"] = figures["load_seconds"] + figures["compile_seconds"]
    runs = [generate(prompt, args.new_tokens) for _ in range(args.repeats)]
    figures["decode_tokens_per_s"] = statistics.median(r["decode_tokens_per_s"] for r in runs)
    figures["first_token_seconds"] = statistics.median(r["first_token_seconds"] for r in runs)
    figures["new_tokens"] = len(runs[0]["tokens"])
    generate(long_prompt, 1)  # first-call allocations at this length
    figures["prefill_tokens_per_s"] = statistics.median(
        generate(long_prompt, 1)["prefill_tokens_per_s"] for _ in range(args.repeats)
    )
    return figures | quality(ckpt, long_prompt, args.eval_bytes, ref)


def quality(ckpt: Any, ids: list[int], eval_bytes: int, ref: Path) -> dict:
    """Bits per byte on held-out text, and the relative RMS error of the logits of ids against fp32's (in ref)."""
    import torch

    from nomoat.eval.loss import evaluate_text

    with torch.no_grad():
        logits = ckpt.model(torch.tensor([ids])).float()  # (1, T, V)
    figures: dict = {}
    if not ref.exists():
        torch.save(logits, ref)
    else:
        base = torch.load(ref)
        figures["logits_rel_rms"] = float((logits - base).norm() / base.norm())
        figures["top1_agreement"] = float((logits.argmax(-1) == base.argmax(-1)).float().mean())
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write(held_out_text()[1].encode()[:eval_bytes].decode(errors="ignore"))
        f.flush()
        figures["bits_per_byte"] = evaluate_text(ckpt.model, ckpt.tokenizer, [f.name])["bits_per_byte"]
    return figures


# --- serving: both servers in child processes, the same streamed /v1/completions requests ----------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, log: Path, threads: int) -> tuple[subprocess.Popen, float]:
    """Start a server and wait until /health answers; returns it and the seconds that took (its start-up)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # nomoat's torch threads; llama-server takes -t
    start = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    while time.perf_counter() - start < 600:
        if process.poll() is not None:
            sys.exit(f"{' '.join(cmd)} stopped while starting:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return process, time.perf_counter() - start
        except OSError:  # not listening yet, or llama-server's 503 while it loads
            time.sleep(0.1)
    process.kill()
    sys.exit(f"{' '.join(cmd)} did not come up in 600 s")


async def one_request(client: Any, model: str, prompt: list[int], max_tokens: int) -> tuple[float, int, int]:
    """Stream one completion greedily: (seconds to the first text chunk, tokens by usage, chunks with text)."""
    start = time.perf_counter()
    ttft, tokens, chunks = None, 0, 0
    stream = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},  # nomoat ignores ignore_eos
    )  # fmt: skip
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            ttft = ttft or time.perf_counter() - start
            chunks += 1
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    assert ttft is not None, "the stream carried no text"
    return ttft, tokens, chunks


async def run_clients(client: Any, model: str, clients: int, per_client: int, prompts: list[list[int]],
                      max_tokens: int) -> dict:  # fmt: skip
    """`clients` concurrent loops, each sending per_client requests one after another (as serve_load.py does)."""

    async def loop(c: int) -> list[tuple[float, int, int]]:
        return [await one_request(client, model, prompts[(c * per_client + r) % len(prompts)], max_tokens)
                for r in range(per_client)]  # fmt: skip

    start = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(loop(c) for c in range(clients))) for r in rs]
    seconds = time.perf_counter() - start
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "tokens": tokens,
        "text_chunks": sum(r[2] for r in results),
        "tokens_per_s": tokens / seconds,
        "ttft_p50_s": statistics.median(ttfts),
        "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
    }


async def measure_server(url: str, prompts: list[list[int]], args: argparse.Namespace) -> list[dict]:
    import openai

    # A connection per request: no request races a server closing an idle keep-alive connection (seen once with
    # llama-server as "Server disconnected without sending a response"); connecting costs microseconds locally.
    headers = {"Connection": "close"}
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600, default_headers=headers
    ) as client:
        model = (await client.models.list()).data[0].id
        await run_clients(client, model, 1, 1, prompts, 8)  # warm-up: first-call allocations
        return [await run_clients(client, model, c, args.requests_per_client, prompts, args.new_tokens)
                for c in args.clients]  # fmt: skip


def serve_one(cmd: list[str], url: str, prompts: list[list[int]], args: argparse.Namespace, log: Path) -> dict:
    """Start the server, load it with each number of clients, stop it."""
    process, startup = start_server(cmd, url, log, args.threads)
    try:
        return {"startup_seconds": startup, "levels": asyncio.run(measure_server(url, prompts, args))}
    except Exception:
        print(f"{cmd[0]} failed; the end of its log:\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        process.terminate()
        process.wait()


def serving(model: str, files: dict[str, Path], bin_dir: Path, prompts: list[list[int]],
            args: argparse.Namespace, tmp: Path) -> dict:  # fmt: skip
    """Per precision, nomoat serve and llama-server on the matching GGUF, one after the other."""
    rows = {}
    for precision in args.serve_precisions:
        port = free_port()
        quantize = ["--quantize", precision] if PRECISIONS[precision][1] else []
        slots = max(args.clients)
        ours = [sys.executable, "-m", "nomoat", "serve", model, "--port", str(port), "--max-batch", str(slots),
                "--max-context", str(SLOT_CONTEXT), *quantize]  # fmt: skip
        theirs = [str(bin_dir / "llama-server"), "-m", str(files[precision]), "-np", str(slots),
                  "-c", str(slots * SLOT_CONTEXT), "-t", str(args.threads), "--port", str(port),
                  "--host", "127.0.0.1"]  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        rows[precision] = {
            "nomoat": serve_one(ours, url, prompts, args, tmp / "nomoat-serve.log"),
            "llama.cpp": serve_one(theirs, url, prompts, args, tmp / "llama-server.log"),
        }
    return rows


# --- one shape, end to end -------------------------------------------------------------------------------------


def bench_shape(shape: str, args: argparse.Namespace, bin_dir: Path, tmp: Path) -> dict:
    folder = tmp / shape
    folder.mkdir()
    if args.model:
        model, info = args.model, {"shape": Path(args.model).name, "weights": "trained"}
    else:
        model = str(folder / "hf")
        progress(f"{shape}: random weights and a tokenizer")
        info = in_fresh_process(make_random_model, shape, args.n_layer, Path(model)) | {"weights": "random"}
    progress(f"{shape}: exporting to GGUF, quantizing with llama-quantize")
    ids = in_fresh_process(prompt_ids, model, max(args.prefill_tokens, 64 * args.prompt_tokens))
    files, export_seconds = export_ggufs(model, folder, bin_dir)
    progress(f"{shape}: llama-bench")
    llama = {p: llama_bench(bin_dir, f, args) for p, f in files.items()}
    nomoat = {}
    for precision, (_, quantize) in PRECISIONS.items():  # fp32 first: it writes the reference logits
        progress(f"{shape}: nomoat {precision} in a fresh process")
        nomoat[precision] = in_fresh_process(nomoat_side, model, quantize, ids, args, folder / "fp32_logits.pt")
    serve = {}
    if not args.skip_serve:
        progress(f"{shape}: serving, nomoat serve and llama-server")
        prompts = [ids[i : i + args.prompt_tokens] for i in range(0, 64 * args.prompt_tokens, args.prompt_tokens)]
        serve = serving(model, files, bin_dir, prompts, args, folder)
    return {**info, "export_f32_seconds": export_seconds, "llama.cpp": llama, "nomoat": nomoat, "serve": serve}


# --- the report ------------------------------------------------------------------------------------------------


def cpu_description() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    flags = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni") if f in flags]
    amx = [f for f in flags if f.startswith("amx")]
    return f"{model}, {os.cpu_count()} cores; {' '.join(wanted)}; {'AMX: ' + ' '.join(amx) if amx else 'no AMX'}"


# (what, value, unit: "x" a ratio, "%" a relative change or "s" seconds, target: (">=" or "<=", bound) or None)
Row = tuple[str, float, str, tuple[str, float] | None]


def speed_rows(result: dict, args: argparse.Namespace) -> list[Row]:
    ours, theirs = result["nomoat"], result["llama.cpp"]
    rows: list[Row] = []
    for p, (gguf_type, _) in PRECISIONS.items():
        vs = f"{p} vs {gguf_type}"
        rows.append((f"decode {vs}", ours[p]["decode_tokens_per_s"] / theirs[p]["decode_tokens_per_s"], "x", (">=", 1)))
    for p, (gguf_type, _) in PRECISIONS.items():
        ratio = ours[p]["prefill_tokens_per_s"] / theirs[p]["prefill_tokens_per_s"]
        rows.append((f"prefill {args.prefill_tokens} {p} vs {gguf_type}", ratio, "x", (">=", 1)))
    for p, (gguf_type, _) in PRECISIONS.items():
        ratio = theirs[p]["first_token_seconds"] / ours[p]["first_token_seconds"]
        # the goal is a first token within 2x llama.cpp's time
        rows.append((f"first token ({args.prompt_tokens}) {p} vs {gguf_type}", ratio, "x", (">=", 0.5)))
    for p in PRECISIONS:
        rows.append((f"nomoat start-up {p}: load + compile", ours[p]["startup_seconds"], "s", ("<=", 5)))
    for p, sides in result["serve"].items():
        for ours_level, theirs_level in zip(sides["nomoat"]["levels"], sides["llama.cpp"]["levels"], strict=True):
            c, vs = ours_level["clients"], f"{p} vs {PRECISIONS[p][0]}"
            ratio = ours_level["tokens_per_s"] / theirs_level["tokens_per_s"]
            rows.append((f"serve {c} client(s) tok/s {vs}", ratio, "x", (">=", 1)))
            for q in ("p50", "p99"):
                ratio = theirs_level[f"ttft_{q}_s"] / ours_level[f"ttft_{q}_s"]
                rows.append((f"serve {c} client(s) TTFT {q} {vs}", ratio, "x", (">=", 1)))
        ratio = sides["llama.cpp"]["startup_seconds"] / sides["nomoat"]["startup_seconds"]
        rows.append((f"server start-up {p} (time to ready)", ratio, "x", None))
    return rows


def quality_rows(result: dict) -> list[Row]:
    ours = result["nomoat"]
    rows: list[Row] = []
    for p, bound_bpb, bound_mem in (("int8", 0.005, 0.35), ("int4", 0.04, 0.22)):
        change = abs(ours[p]["bits_per_byte"] / ours["fp32"]["bits_per_byte"] - 1)
        rows.append((f"bits per byte change {p} vs fp32", change, "%", ("<=", bound_bpb)))
        rows.append((f"logits relative RMS error {p} vs fp32", ours[p]["logits_rel_rms"], "%", None))
        for how in ("rss_growth_mib", "tensor_mib"):
            ratio = ours[p][how] / ours["fp32"][how]
            rows.append((f"weights memory {p} / fp32 ({how.removesuffix('_mib')})", ratio, "x", ("<=", bound_mem)))
    return rows


def print_details(shape: str, result: dict, args: argparse.Namespace) -> None:
    ours, theirs = result["nomoat"], result["llama.cpp"]
    size = f"{result['n_layer']} layers, {result['params_m']}M parameters, " if "n_layer" in result else ""
    print(f"\n== {shape}: {size}{result['weights']} weights; F32 export {result['export_f32_seconds']:.1f} s")
    header = "".join(f"{'nomoat ' + p:>14}{'llama ' + t:>14}" for p, (t, _) in PRECISIONS.items())
    print(f"{'':28}{header}")
    lines = (  # (label, nomoat's key, llama.cpp's key, format)
        ("decode tok/s", "decode_tokens_per_s", "decode_tokens_per_s", "{:14.1f}"),
        (f"prefill {args.prefill_tokens} tok/s", "prefill_tokens_per_s", "prefill_tokens_per_s", "{:14.1f}"),
        (f"first token ({args.prompt_tokens}) s", "first_token_seconds", "first_token_seconds", "{:14.3f}"),
        ("load s", "load_seconds", None, "{:14.2f}"),
        ("compile (1st generate) s", "compile_seconds", None, "{:14.2f}"),
        ("weights: RSS growth MiB", "rss_growth_mib", None, "{:14.1f}"),
        ("  of which mapped files", "file_growth_mib", None, "{:14.1f}"),
        ("weights: tensors MiB", "tensor_mib", "file_mib", "{:14.1f}"),
        ("bits per byte", "bits_per_byte", None, "{:14.4f}"),
        ("logits rel. RMS vs fp32", "logits_rel_rms", None, "{:14.4f}"),
        ("top-1 agreement vs fp32", "top1_agreement", None, "{:14.4f}"),
    )
    for label, mine, peer, fmt in lines:
        cells = [(fmt.format(ours[p][mine]) if mine in ours[p] else f"{'-':>14}")
                 + (fmt.format(theirs[p][peer]) if peer else f"{'-':>14}") for p in PRECISIONS]  # fmt: skip
        print(f"{label:28}{''.join(cells)}")
    print(f"(llama.cpp: tensors = the GGUF file; first token = {args.prompt_tokens} / its pp{args.prompt_tokens} "
          f"rate; nomoat decoded {ours['fp32']['new_tokens']} tokens a run)")  # fmt: skip
    for p, sides in result["serve"].items():
        print(f"serving {p}: nomoat ready in {sides['nomoat']['startup_seconds']:.1f} s (load + compile), "
              f"llama-server in {sides['llama.cpp']['startup_seconds']:.1f} s")  # fmt: skip
        print(f"  {'server':10}{'clients':>8}{'requests':>9}{'tokens':>8}{'chunks':>8}{'tok/s':>9}{'TTFT p50':>10}"
              f"{'TTFT p99':>10}")  # fmt: skip
        for side, measured in sides.items():
            for r in measured["levels"]:
                print(f"  {side:10}{r['clients']:>8}{r['requests']:>9}{r['tokens']:>8}{r['text_chunks']:>8}"
                      f"{r['tokens_per_s']:>9.1f}{r['ttft_p50_s']:>9.3f}s{r['ttft_p99_s']:>9.3f}s")  # fmt: skip


def print_summary(rows: list[tuple[str, Row]]) -> None:
    print("\nsummary: ratios are nomoat / llama.cpp (times: llama.cpp / nomoat), so > 1 means nomoat is better")
    for shape, (what, value, unit, target) in rows:
        shown = f"{100 * value:.2f}%" if unit == "%" else f"{value:.2f}{unit}"
        goal, met = "", ""
        if target is not None:
            op, bound = target
            goal = f"{op} {100 * bound:g}%" if unit == "%" else f"{op} {bound:g}{unit}"
            met = "met" if (value >= bound if op == ">=" else value <= bound) else "NOT met"
        print(f"  {shape:8}{what:44}{shown:>10}  {goal:>9}  {met}")


def main() -> None:
    args = parse_args()
    shapes = ["model"] if args.model else ["smollm", "gpt2"] if args.shape == "both" else [args.shape]
    bin_dir = llama_bin()
    results, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            results[shape] = bench_shape(shape, args, bin_dir, Path(tmp))
            rows += [(shape, row) for row in speed_rows(results[shape], args) + quality_rows(results[shape])]
    llama = next(iter(results.values()))["llama.cpp"]["fp32"]
    print(f"CPU: {cpu_description()}\nllama.cpp: build {llama['build']}, {llama['cpu_info']}; threads {args.threads}")
    for shape, result in results.items():
        print_details(shape, result, args)
    print_summary(rows)
    if args.json:
        summary = [{"shape": s, "what": w, "value": v, "unit": u, "target": t} for s, (w, v, u, t) in rows]
        print(json.dumps({"cpu": cpu_description(), "llama_cpp_build": llama["build"], "threads": args.threads,
                          "results": results, "summary": summary}))  # fmt: skip


if __name__ == "__main__":
    main()
