"""GGUF export and import: time and peak memory of nomoat against llama.cpp's own tools, on one machine, in one run.

Export: `nomoat convert to-gguf` against llama.cpp's `convert_hf_to_gguf.py` (run through
scripts/llamacpp_convert.py) on the same Hugging Face folder: a SmolLM2-135M-shaped LLaMA (30 layers x 576, GQA
9/3, 49,152 tied vocabulary) with random fp32 weights. Import: nomoat's `load_model(FILE.gguf)` against
transformers' `from_pretrained(gguf_file=...)` of the same file. Each side runs in a fresh process; peak is its
resident high-water mark, also shown as a multiple of the weights' bytes. Needs llama.cpp's source
(`scripts/llamacpp.sh --source`). Usage: `python benchmarks/gguf.py [--type f32] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "nomoat/assets/tinyshakespeare.txt"
# Runs argv[1:] as a child and prints its wall seconds and peak resident KiB (ru_maxrss of the waited child).
MEASURE = (
    "import resource, subprocess, sys, time; t = time.perf_counter(); subprocess.run(sys.argv[1:], check=True); "
    "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0"], help="GGUF weight type")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def measured(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak MiB) of cmd run in a fresh process of its own."""
    out = subprocess.run([sys.executable, "-c", MEASURE, *cmd], check=True, capture_output=True, text=True)
    seconds, kib = out.stdout.split()[-2:]
    return float(seconds), int(kib) / 1024


def make_folder(folder: Path) -> int:
    """The SmolLM2-135M shape with random weights as a Hugging Face folder; returns the weights' bytes."""
    import torch

    from nomoat.checkpoint import Checkpoint
    from nomoat.config import ModelConfig, RunConfig, TrainConfig
    from nomoat.convert import to_hf
    from nomoat.model import Transformer
    from nomoat.tokenizer import train_tokenizer

    cfg = ModelConfig(
        vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, d_model=576, d_ff=1536, max_seq_len=2048,
        norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=True, init="normal",
        rope_theta=100000.0,
    )  # fmt: skip
    tok = train_tokenizer([SHAKESPEARE.read_text()], 8192)
    torch.manual_seed(0)
    model = Transformer(cfg)
    to_hf(Checkpoint(folder, RunConfig(model=cfg, train=TrainConfig()), model, tok, None), folder / "hf")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def source() -> Path:
    found = subprocess.run(["bash", str(ROOT / "scripts/llamacpp.sh"), "--source"], capture_output=True, text=True)
    if found.returncode != 0:
        sys.exit(f"llama.cpp's source is needed: {found.stderr.strip()}")
    return Path(found.stdout.strip())


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        weights = make_folder(root)
        ours_file, theirs_file = root / "ours.gguf", root / "theirs.gguf"
        nomoat = [sys.executable, "-m", "nomoat", "convert", "to-gguf", str(root / "hf"), str(ours_file)]
        theirs = [sys.executable, str(ROOT / "scripts/llamacpp_convert.py"), str(source()), "gpt-2", str(root / "hf"),
                  "--outfile", str(theirs_file), "--outtype", args.type]  # fmt: skip
        export = {"nomoat": measured([*nomoat, "--type", args.type]), "llama.cpp": measured(theirs)}
        load = "from {m} import {f}; import sys; {f}({a})"
        ours_load = load.format(m="nomoat.load", f="load_model", a="sys.argv[1]")
        hf_load = (
            "import sys; from pathlib import Path; from transformers import AutoModelForCausalLM as A; "
            "p = Path(sys.argv[1]); A.from_pretrained(p.parent, gguf_file=p.name)"
        )
        imports = {
            "nomoat": measured([sys.executable, "-c", ours_load, str(theirs_file)]),
            "transformers": measured([sys.executable, "-c", hf_load, str(theirs_file)]),
        }
        sizes = {"nomoat": ours_file.stat().st_size, "llama.cpp": theirs_file.stat().st_size}
    report(args, weights, export, imports, sizes)


def cpu_flags() -> str:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    return f"{model.split(':', 1)[1].strip()}; " + " ".join(f for f in wanted if f in flags.split())


def report(args, weights: int, export: dict, imports: dict, sizes: dict) -> None:
    mib = weights / 2**20
    print(f"SmolLM2-135M shape, {mib:,.0f} MiB of fp32 weights, GGUF {args.type}; CPU: {cpu_flags()}")
    for title, rows, peer in (("export", export, "llama.cpp"), ("import", imports, "transformers")):
        for name, (seconds, peak) in rows.items():
            print(f"{title:7s}{name:13s}{seconds:7.2f} s   peak {peak:7,.0f} MiB ({peak / mib:.2f}x the weights)")
        print(f"{title:7s}speed nomoat / {peer}: {rows[peer][0] / rows['nomoat'][0]:.2f}x")
    if args.json:
        print(json.dumps({"type": args.type, "weights_mib": mib, "export": export, "import": imports,
                          "file_bytes": sizes, "cpu": cpu_flags()}))  # fmt: skip


if __name__ == "__main__":
    main()
