"""Tests for nomoat/data/ray_engine.py: a recipe built on a local Ray equals the local engine's build, byte for byte.

One Ray session serves the module (starting Ray takes seconds); the corpus and recipe are test_recipe.py's.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_recipe import CHUNKS, file_hashes, root, write_recipe  # noqa: F401 (root is a fixture)

from nomoat.cli import main
from nomoat.data import build_corpus, encode, load_recipe, ray_engine
from nomoat.data.stages import Preparer
from nomoat.errors import UserError
from nomoat.tokenizer import Tokenizer

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # Ray's start-up alone takes several seconds on 2 cores
real_stages = ray_engine._stages


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def test_ray_output_equals_local(root: Path, ray_session: None) -> None:  # noqa: F811
    # Two actors and a batch of documents per file, so the keep-first pass takes batches from both; a fractional
    # weight and a val split, so repeats and splits are decided in the actors too.
    corpus = {"tokenizer": "tokenizer.json", "val_fraction": 0.1, "seed": 0, "workers": 2}
    recipe = write_recipe(root, "ray.toml", weights=(2, 0.5), corpus=corpus)
    local = build_corpus(recipe, root / "local", progress=False)
    on_ray = build_corpus(recipe, root / "ray", progress=False, engine="ray")
    assert on_ray == local
    plays, pile = local["sources"]
    assert plays["exact_duplicates"] == plays["near_duplicates"] == pile["contaminated"] == 1
    assert plays["documents_out"] == 40 and local["splits"]["val"]["tokens"] > 0
    assert file_hashes(root / "ray") == file_hashes(root / "local")


def test_ray_strict_bad_line_and_cli(
    root: Path,  # noqa: F811
    ray_session: None,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = [json.dumps({"text": c}) for c in CHUNKS[45:48]]
    (root / "bad.jsonl").write_text("\n".join([lines[0], '{"text": "cut off', *lines[1:]]) + "\n")
    corpus = {"tokenizer": "tokenizer.json", "val_fraction": 0.0, "engine": "ray"}
    recipe = write_recipe(root, "ray_bad.toml", corpus=corpus, source=[{"name": "bad", "path": "bad.jsonl"}])
    calls = []
    monkeypatch.setattr(ray_engine, "_stages", lambda *a: calls.append(1) or real_stages(*a))
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):  # raised in a reading task
        build_corpus(recipe, root / "ray_strict", progress=False, strict=True)
    assert calls == [1] and not (root / "ray_strict").exists()  # corpus.engine chose Ray
    assert main(["data", "build", str(recipe), "--out", str(root / "ray_cli"), "--engine", "ray", "--json"]) == 0
    assert f"{root / 'bad.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    assert json.loads((root / "ray_cli" / "datasheet.json").read_text())["sources"][0]["bad_lines"] == 1


def test_actor_encodes_in_the_local_engines_batches(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    # In-process, no Ray: a batch of kept documents longer than an encode batch comes back as several, in order.
    monkeypatch.setattr(encode, "BATCH_CHARS", 4000)
    monkeypatch.setattr(ray_engine, "BATCH_CHARS", 4000)
    tok = Tokenizer.load(root / "tokenizer.json")
    worker = ray_engine._Worker(Preparer(load_recipe(write_recipe(root)), None), tok, 0.0)
    kept = [(k, 2 if k == 3 else 1) for k in range(10)]
    parts = worker.encode(CHUNKS[:10], 0, kept)
    assert len(parts) > 2
    expected = [t for k, copies in kept for _ in range(copies) for t in [*tok.encode(CHUNKS[k]), tok.eos_id]]
    assert np.concatenate([p.tokens["train"] for p in parts]).tolist() == expected
    assert sum(p.counts[0, "train"][0] for p in parts) == 11


def test_an_unreachable_cluster_is_named_at_once() -> None:
    with pytest.raises(UserError, match=r"cannot join the Ray cluster at 127.0.0.1:1: "):
        ray_engine._check_reachable("127.0.0.1:1")  # nothing listens on port 1; Ray itself would retry for minutes
    ray_engine._check_reachable("auto")  # forms Ray resolves itself pass through
