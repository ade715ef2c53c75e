"""Which training recipe learns most per wall-clock second on this machine: an equal-time ablation.

On each corpus (the bundled Shakespeare, and the Python standard library's own source as a second, permissively
licensed one: PSF licence, ~1.1 MB, a different domain), the old `cpu` preset (AdamW, fp32) trains its 900
steps; its training seconds become the budget (`train.time_budget`) of every other variant, which adds one change
at a time: Muon, QK-norm, the CPU's measured precision, and finally today's `cpu` preset. Printed per run:
validation bits per byte, training seconds, steps, and the step at which validation first reached the baseline's
final figure (validation every 50 steps, outside the budget). Usage:
`python benchmarks/recipe.py [--corpus shakespeare,stdlib] [--variants 0,1,4] [--json]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path
from typing import Any

import torch

from nomoat.config import RunConfig, from_dict, load_config, replace
from nomoat.data import build_shards
from nomoat.demo import CORPUS
from nomoat.device import cpu_description
from nomoat.tokenizer import train_tokenizer
from nomoat.train import train

# The `cpu` preset before issue 15 (AdamW, fp32 on CPU), kept here as the fixed baseline.
OLD_PRESET = {
    "model": {
        "vocab_size": 2048, "n_layer": 4, "n_head": 4, "d_model": 192, "d_ff": 512, "max_seq_len": 256,
        "norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False, "tie_embeddings": True, "init": "gpt2",
    },
    "train": {
        "steps": 900, "batch_size": 16, "seq_len": 128, "lr": 2e-3, "min_lr_ratio": 0.05, "schedule": "wsd",
        "warmup_steps": 50, "decay_frac": 0.3, "weight_decay": 0.1, "beta2": 0.99, "dtype": "float32",
    },
}  # fmt: skip
MUON, QK = {"optimizer": "muon", "muon_lr": 0.04}, {"qk_norm": True}
VARIANTS: list[tuple[str, dict[str, dict[str, Any]] | None]] = [
    ("old preset: AdamW, fp32", {}),
    ("+ Muon", {"train": MUON}),
    ("+ Muon + QK-norm", {"train": MUON, "model": QK}),
    ("+ Muon + QK-norm + auto precision", {"train": {**MUON, "dtype": "auto"}, "model": QK}),
    ("today's cpu preset", None),
]


def corpus_text(name: str) -> tuple[str, str]:
    """(text, where it comes from and its licence)."""
    if name == "shakespeare":
        return CORPUS.read_text(), "tiny shakespeare (public domain)"
    if name == "stdlib":  # sorted, tests left out, cut to Shakespeare's size
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = ("test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo")
        files = sorted(p for p in root.rglob("*.py") if not set(p.relative_to(root).parts) & set(skip))
        text, size = "", len(CORPUS.read_text())
        for path in files:
            text += path.read_text(errors="replace") + "\n"
            if len(text) >= size:
                break
        return text[:size], f"Python {sys.version.split()[0]} standard library source (PSF licence)"
    raise SystemExit(f"unknown corpus {name!r} (shakespeare, stdlib)")


def prepare(name: str, out: Path) -> tuple[Path, Path]:
    """Tokenizer and shards for a corpus (first 90% train, last 10% validation), built once into out."""
    shards, tok_file = out / "shards", out / "tokenizer.json"
    if not (shards / "manifest.json").is_file():
        text, _ = corpus_text(name)
        cut = int(len(text) * 0.9)
        out.mkdir(parents=True, exist_ok=True)
        (out / "train.txt").write_text(text[:cut])
        (out / "val.txt").write_text(text[cut:])
        tokenizer = train_tokenizer([text[:cut]], OLD_PRESET["model"]["vocab_size"])
        tokenizer.save(tok_file)
        build_shards([out / "train.txt"], tokenizer, shards, val_inputs=[out / "val.txt"], progress=False)
    return shards, tok_file


def variant_config(change: dict[str, dict[str, Any]] | None, data: dict[str, str], out: Path) -> RunConfig:
    if change is None:
        cfg = load_config("cpu")
    else:
        cfg = from_dict({s: {**OLD_PRESET.get(s, {}), **change.get(s, {})} for s in ("model", "train")})
    train_over = {"out_dir": str(out), "eval_every": 50, "save_every": 0, "keep_last": 1}
    return replace(cfg, data=data, train=train_over)


def run_one(cfg: RunConfig, budget: float) -> dict[str, Any]:
    if budget:
        cfg = replace(cfg, train={"time_budget": budget})
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "val_bpb": result.val_bpb,
        "train_seconds": result.train_seconds,
        "steps": result.step,
        "dtype": rows[0].get("dtype"),
        "curve": [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="shakespeare,stdlib")
    p.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))))
    p.add_argument("--out", default="runs/recipe")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    chosen = [int(i) for i in args.variants.split(",")]
    print(f"CPU: {cpu_description()}; torch {torch.__version__}", flush=True)
    report: dict[str, Any] = {"cpu": cpu_description(), "corpora": {}}
    for name in args.corpus.split(","):
        out = Path(args.out) / name
        shards, tok = prepare(name, out)
        text, source = corpus_text(name)
        print(f"\n{name}: {source}, {len(text):,} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}")
        data = {"shards": str(shards), "tokenizer": str(tok)}
        runs: dict[str, Any] = {}
        budget, target = 0.0, 0.0
        for i in [0, *[c for c in chosen if c]]:  # the baseline sets the budget, so it always runs
            label, change = VARIANTS[i]
            r = run_one(variant_config(change, data, out / f"v{i}"), budget)
            if i == 0:
                budget, target = r["train_seconds"], r["val_bpb"]
            r["steps_to_baseline"] = next((s for s, bpb in r["curve"] if bpb <= target + 1e-9), None)
            runs[label] = r
            reached = r["steps_to_baseline"] or "not reached"
            print(
                f"  {label:<36} val {r['val_bpb']:.4f} bpb  {r['train_seconds']:6.1f} s  {r['steps']:5d} steps  "
                f"{r['dtype']:>8}  reached {target:.4f} at step {reached}",
                flush=True,
            )
        report["corpora"][name] = {"source": source, "budget_s": budget, "runs": runs}
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
