"""Lineage: the corpus datasheet travels into every checkpoint, and `nomoat info` reports it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import tomli_w
from conftest import SHAKESPEARE, tiny_run

from nomoat.config import replace
from nomoat.data import build_corpus
from nomoat.lineage import format_lineage, lineage
from nomoat.tokenizer import train_tokenizer
from nomoat.train import train


def test_datasheet_travels_into_checkpoints_and_info_reports_it(tmp_path: Path) -> None:
    words = SHAKESPEARE.read_text()[:120_000].split()
    (tmp_path / "plays").mkdir()
    for i in range(30):  # 150-word documents, ten words a line, long enough for the quality rules
        chunk = words[i * 150 : (i + 1) * 150]
        (tmp_path / "plays" / f"{i:02d}.txt").write_text(
            "\n".join(" ".join(chunk[j : j + 10]) for j in range(0, 150, 10))
        )
    train_tokenizer([SHAKESPEARE.read_text()[:100_000]], vocab_size=300).save(tmp_path / "tokenizer.json")
    recipe = {
        "corpus": {"tokenizer": "tokenizer.json", "val_fraction": 0.0},
        "source": [{"name": "plays", "path": "plays", "license": "public domain", "url": "https://example.org/plays"}],
    }
    (tmp_path / "recipe.toml").write_text(tomli_w.dumps(recipe))
    build_corpus(tmp_path / "recipe.toml", tmp_path / "shards", progress=False)

    cfg = tiny_run((tmp_path / "shards", tmp_path / "tokenizer.json"), tmp_path / "run", steps=2, save_every=0)
    result = train(replace(cfg, train={"eval_every": 0}), progress=False)
    assert (result.checkpoint / "datasheet.json").is_file()

    info = lineage(tmp_path / "run")
    assert info["base"] is None and info["tokenizer"]["vocab_size"] == 300
    [source] = info["data"]
    assert source["name"] == "plays" and source["license"] == "public domain" and len(source["files"]) == 30
    assert "data       plays:" in format_lineage(info) and "public domain" in format_lineage(info)

    proc = subprocess.run([sys.executable, "-m", "nomoat.cli", "info", str(tmp_path / "run"), "--json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert json.loads(proc.stdout.splitlines()[-1])["data"][0]["url"] == "https://example.org/plays"


def test_the_demo_corpus_carries_its_licence_into_the_model(shakespeare_shards, tmp_path: Path) -> None:
    """Shards built straight from files (as the demo builds the bundled Shakespeare) get a datasheet too."""
    from nomoat.data import load_manifest, write_source_datasheet
    from nomoat.demo import SOURCE

    shards = tmp_path / "shards"
    shutil.copytree(shakespeare_shards[0], shards)
    sheet = write_source_datasheet(shards, load_manifest(shards), SOURCE)
    assert sheet["splits"]["val"]["tokens"] > 0 and len(sheet["sources"][0]["files"]) == 2
    cfg = tiny_run((shards, shakespeare_shards[1]), tmp_path / "run", steps=1, save_every=0, eval_every=0)
    train(cfg, progress=False)
    [source] = lineage(tmp_path / "run")["data"]
    assert source["name"] == "tiny shakespeare" and source["license"].startswith("public domain")


def test_info_on_a_hugging_face_folder_shows_size_and_tokenizer(shakespeare_shards, tmp_path: Path) -> None:
    """`nomoat info` on a Hugging Face folder: the parameter count (as transformers counts it), the weights' size
    and dtype, and the tokenizer's vocabulary, read without loading the weights."""
    import torch
    import transformers

    from nomoat.checkpoint import save_checkpoint
    from nomoat.convert import to_hf
    from nomoat.load import load_model
    from nomoat.model import Transformer
    from nomoat.tokenizer import Tokenizer

    cfg = tiny_run(shakespeare_shards, tmp_path / "run")
    save_checkpoint(tmp_path / "run", 1, Transformer(cfg.model), cfg, Tokenizer.load(shakespeare_shards[1]))
    to_hf(load_model(tmp_path / "run"), tmp_path / "hf", dtype=torch.bfloat16)
    info = lineage(tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").num_parameters()
    assert info["model"]["parameters"] == reference
    assert info["model"]["dtype"] == "bfloat16" and info["model"]["weight_bytes"] > 2 * reference
    assert info["tokenizer"]["vocab_size"] == 320 and info["base"] == str(tmp_path / "hf")
    text = format_lineage(info)
    assert "a Hugging Face LlamaForCausalLM folder" in text and f"{reference:,} parameters" in text
    assert "tokenizer  320 tokens" in text and "MB of weights (bfloat16)" in text


def test_info_on_a_checkpoint_shows_its_weights_size_and_dtype(shakespeare_shards, tmp_path: Path, capsys) -> None:
    """The size and storage dtype come from the safetensors header (a bf16 copy halves the bytes); a corrupt
    weight file is one line and exit status 2."""
    import torch

    from nomoat.checkpoint import save_checkpoint
    from nomoat.cli import main
    from nomoat.model import Transformer
    from nomoat.tokenizer import Tokenizer

    cfg = tiny_run(shakespeare_shards, tmp_path / "run")
    model, tok = Transformer(cfg.model), Tokenizer.load(shakespeare_shards[1])
    save_checkpoint(tmp_path / "run", 1, model, cfg, tok)
    info = lineage(tmp_path / "run")
    weights = next((tmp_path / "run").rglob("model.safetensors"))
    assert info["model"]["weight_bytes"] == weights.stat().st_size and info["model"]["dtype"] == "float32"
    assert info["model"]["weight_bytes"] > 4 * info["model"]["parameters"] * 0.9
    assert f"{weights.stat().st_size / 1e6:,.1f} MB of weights (float32)" in format_lineage(info)
    save_checkpoint(tmp_path / "half", 1, model.to(torch.bfloat16), cfg, tok)
    half = lineage(tmp_path / "half")["model"]
    assert half["dtype"] == "bfloat16" and half["weight_bytes"] < 0.6 * info["model"]["weight_bytes"]

    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    assert main(["info", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.safetensors: not a readable safetensors file" in err
