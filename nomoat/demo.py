"""The demo: the whole loop on the bundled Shakespeare, in about three minutes on 2 CPU cores.

corpus (first 90% train, last 10% validation, nanoGPT's split) -> tokenizer -> shards -> train the `cpu`
preset -> validation bits per byte -> loss plot -> a sample. Each step is the same library call the CLI makes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from nomoat.config import load_config
from nomoat.data import build_shards, load_manifest, write_source_datasheet
from nomoat.generate import generate_text
from nomoat.load import load_model
from nomoat.tokenizer import train_tokenizer
from nomoat.train import train

CORPUS = Path(__file__).parent / "assets" / "tinyshakespeare.txt"
PROMPT = "ROMEO:\n"
SOURCE = {
    "name": "tiny shakespeare",
    "license": "public domain (Shakespeare's plays; the file is char-rnn's data/tinyshakespeare/input.txt)",
    "url": "https://github.com/karpathy/char-rnn",
}


def run_demo(out_dir: str | Path = "runs/demo", progress: bool = True) -> dict[str, Any]:
    """Run the demo from scratch in out_dir (replacing an earlier demo there) and return its figures and sample.
    With `progress`, each step's line and progress bar go to stderr. Ctrl-C in training raises
    TrainingInterrupted once the checkpoint is saved."""
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    corpus = out / "corpus"
    corpus.mkdir(parents=True)
    text = CORPUS.read_text()
    cut = int(len(text) * 0.9)
    (corpus / "train.txt").write_text(text[:cut])
    (corpus / "val.txt").write_text(text[cut:])

    cfg = load_config(
        "cpu",
        {
            "data.shards": str(out / "shards"),
            "data.tokenizer": str(out / "tokenizer.json"),
            "train.out_dir": str(out / "run"),
        },
    )
    say = print if progress else lambda *a, **k: None
    say(
        f"[1/4] training a {cfg.model.vocab_size}-token byte-level BPE tokenizer on {cut:,} characters",
        file=sys.stderr,
    )
    tokenizer = train_tokenizer([text[:cut]], cfg.model.vocab_size)
    tokenizer.save(cfg.data.tokenizer)
    say("[2/4] building token shards", file=sys.stderr)
    build_shards([corpus / "train.txt"], tokenizer, cfg.data.shards, val_inputs=[corpus / "val.txt"], progress=progress)
    write_source_datasheet(Path(cfg.data.shards), load_manifest(cfg.data.shards), SOURCE)  # travels with the model
    say(
        f"[3/4] training {cfg.model.n_layer} layers x {cfg.model.d_model} for {cfg.train.steps} steps",
        file=sys.stderr,
    )
    result = train(cfg, progress=progress)
    plot = result.run_dir / "loss.png"
    say(f"validation: {result.val_bpb:.3f} bits per byte (nanoGPT's CPU recipe: 2.72); plot: {plot}", file=sys.stderr)
    say("[4/4] sampling", file=sys.stderr)
    ckpt = load_model(result.checkpoint)
    sample = PROMPT + "".join(
        generate_text(ckpt.model, ckpt.tokenizer, PROMPT, max_new_tokens=200, temperature=0.8, top_k=50, seed=0)
    )
    return {  # the sample is the command's output (stdout), so it is printed there, not here
        "val_bpb": result.val_bpb,
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
        "val_loss": result.val_loss,
        "steps": result.step,
        "checkpoint": str(result.checkpoint),
        "sample": sample,
    }
