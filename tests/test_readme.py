"""The README's tour runs as written: its commands, in order, in a folder holding a small corpus, so that a README
edit that breaks the tour fails here. Only what costs time is made small: flags appended to a command (the last
one wins), a checkpoint's step number (it depends on the steps run), and, for `demo`, the corpus and steps."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import tomli_w

from nomoat.checkpoint import list_checkpoints
from nomoat.cli import main
from nomoat.config import from_dict, read_toml

README = Path(__file__).parents[1] / "README.md"
SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"
# Appended to the commands that start with these words: a few tiny steps, checkpoints at 2 and 4.
SMALL = {
    "nomoat train --config cpu": "--train.steps 4 --train.save_every 2 --train.eval_every 2 --train.eval_batches 2 "
    "--train.batch_size 2 --train.dtype float32",
    "nomoat train --config runs/a/": "--train.steps 6",  # the resumed run goes two steps further
}


def tour_commands() -> list[list[str]]:
    """The shell commands of the tour's code block, one argv each (comments dropped, continuations joined)."""
    section = README.read_text().split("## A tour of the commands", 1)[1]
    found = re.search(r"```sh\n(.*?)```", section, re.S)
    assert found, "README.md: the tour has no ```sh block"
    lines = found.group(1).replace("\\\n", " ").splitlines()
    return [argv for argv in (shlex.split(line, comments=True) for line in lines) if argv]


def write_corpus(root: Path) -> None:
    """corpus/ of 150-word documents (ten words a line, so that the recipe's quality filter keeps them),
    train.txt and val.txt, and the recipe.toml the tour builds."""
    text = SHAKESPEARE.read_text()
    words = text[:400_000].split()
    (root / "corpus").mkdir()
    for k in range(0, 150 * 80, 150):
        doc = "\n".join(" ".join(words[k + j : k + j + 10]) for j in range(0, 150, 10)) + "\n"
        (root / "corpus" / f"{k // 150:03d}.txt").write_text(doc)
    (root / "train.txt").write_text(text[:60_000])
    (root / "val.txt").write_text(text[60_000:66_000])
    recipe = {
        "corpus": {"tokenizer": "tok/tokenizer.json", "val_fraction": 0.1, "workers": 1},
        "source": [{"name": "plays", "path": "corpus", "license": "public domain"}],
    }
    (root / "recipe.toml").write_text(tomli_w.dumps(recipe))


def small_demo(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """`nomoat demo` on 60,000 characters for 4 steps, not the whole play for 700."""
    import nomoat.demo

    (root / "demo.txt").write_text(SHAKESPEARE.read_text()[:60_000])
    monkeypatch.setattr(nomoat.demo, "CORPUS", root / "demo.txt")
    load = nomoat.demo.load_config
    steps = {"train.steps": "4", "train.eval_every": "4", "train.save_every": "4", "train.batch_size": "2"}
    monkeypatch.setattr(nomoat.demo, "load_config", lambda name, overrides: load(name, overrides | steps))


@pytest.mark.slow
def test_the_readme_tour_runs_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    commands = tour_commands()
    assert len(commands) >= 10 and all(argv[0] == "nomoat" for argv in commands), commands
    write_corpus(tmp_path)
    small_demo(monkeypatch, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NOMOAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("nomoat.generate.AUTO_COMPILE_TOKENS", 10**9)  # no decode compile: seconds each on 2 cores
    for argv in commands:
        line = shlex.join(argv)
        if "checkpoints/step_" in line:  # the tour's step number is the preset's; these runs are shorter
            newest = list_checkpoints("runs/a")[-1].name
            argv = [re.sub(r"step_\d{8}", newest, a) for a in argv]
        extra = next((more for start, more in SMALL.items() if line.startswith(start)), "")
        assert main(argv[1:] + extra.split()) == 0, f"README tour: `{line}` failed:\n{capsys.readouterr().err}"
        if argv[1:3] == ["tokenizer", "train"]:
            assert json.loads((tmp_path / "tok/tokenizer.json").read_text())["model"]["vocab"]
    out = capsys.readouterr().out.splitlines()
    assert "val_bpb" in json.loads(out[-1])  # demo --json
    saved = list_checkpoints(tmp_path / "runs/a")[-1]
    assert saved.name == "step_00000006"  # the resumed run continued
    cfg = from_dict(read_toml(saved / "config.toml"))
    assert cfg.model.vocab_size > 2048  # followed the tour's 8192-token tokenizer past the cpu preset's 2048
