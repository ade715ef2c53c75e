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
