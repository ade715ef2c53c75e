"""Shared fixtures: a tiny tokenizer and token shards built once per test session from the bundled Shakespeare."""

from pathlib import Path

import pytest

from nomoat.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from nomoat.data import build_shards
from nomoat.tokenizer import train_tokenizer

SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"


@pytest.fixture(scope="session")
def shakespeare_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(shard dir, tokenizer.json) for the first 100k characters: 90% train, 10% val."""
    root = tmp_path_factory.mktemp("shakespeare")
    text = SHAKESPEARE.read_text()[:100_000]
    (root / "train.txt").write_text(text[:90_000])
    (root / "val.txt").write_text(text[90_000:])
    tok = train_tokenizer([text[:90_000]], vocab_size=320)
    tok.save(root / "tokenizer.json")
    build_shards([root / "train.txt"], tok, root / "shards", val_inputs=[root / "val.txt"], progress=False)
    return root / "shards", root / "tokenizer.json"


def tiny_run(shards: tuple[Path, Path], out_dir: Path, **train: object) -> RunConfig:
    """A run that trains in a second or two on 2 cores."""
    model = ModelConfig(
        vocab_size=320,
        n_layer=2,
        n_head=2,
        d_model=32,
        d_ff=64,
        max_seq_len=64,
        norm="rmsnorm",
        mlp="swiglu",
        pos_emb="rope",
        bias=False,
    )
    defaults = {
        "out_dir": str(out_dir),
        "steps": 20,
        "batch_size": 4,
        "seq_len": 32,
        "lr": 3e-3,
        "dtype": "float32",  # not "auto": a probe could pick bf16 on some CPUs and change every figure
        "warmup_steps": 5,
        "eval_every": 10,
        "eval_batches": 4,
        "save_every": 10,
        "keep_last": 0,
        "log_every": 1,
        "seed": 7,
    }
    defaults.update(train)
    return RunConfig(
        model=model,
        data=DataConfig(shards=str(shards[0]), tokenizer=str(shards[1])),
        train=TrainConfig(**defaults),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def llamacpp() -> Path:
    """The folder of llama.cpp's binaries, built from source once into a cache (scripts/llamacpp.sh). CI builds
    it before the tests, so there a missing build is an error; elsewhere the tests that need it are skipped."""
    import os
    import subprocess

    script = Path(__file__).parents[1] / "scripts/llamacpp.sh"
    # llama.cpp's repacked CPU kernels (AMX on CPUs that have it) crash with a segfault on these tests' tiny q8_0
    # and q4_0 tensors (32-wide rows); its plain kernels compute the same thing. Every llama.cpp binary the tests
    # start reads this (`--no-repack`).
    os.environ["LLAMA_ARG_REPACK"] = "0"
    if os.environ.get("CI") != "true" and os.environ.get("NOMOAT_LLAMACPP") != "1":
        found = subprocess.run(["bash", str(script), "--built"], capture_output=True, text=True)
        if found.returncode != 0:
            pytest.skip("llama.cpp is not built here: run scripts/llamacpp.sh (about 10 minutes, once)")
        return Path(found.stdout.strip())
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
    return Path(done.stdout.strip())


@pytest.fixture(scope="session")
def llamacpp_source(llamacpp: Path) -> Path:
    """llama.cpp's source folder (convert_hf_to_gguf.py, gguf-py, models/), the second reference."""
    import subprocess

    script = Path(__file__).parents[1] / "scripts/llamacpp.sh"
    found = subprocess.run(["bash", str(script), "--source"], capture_output=True, text=True, check=True)
    return Path(found.stdout.strip())
