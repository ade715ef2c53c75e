"""`nomoat run`: stages in order, skipped when done, rerun from a changed one, resumed bit for bit after Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nomoat import pipeline
from nomoat.cli import main
from nomoat.data.datasheet import source_of
from nomoat.errors import UserError
from nomoat.files import file_sha256
from nomoat.lineage import lineage
from nomoat.run_recipe import load_run_recipe, parse_run_recipe, recipe_dict

TINY = """
name = "tiny"
out_dir = "{out}"
[corpus]
files = ["builtin:shakespeare"]
play_tasks = 9
shots = 2
[tokenizer]
vocab_size = 300
[pretrain]
config = "cpu"
[pretrain.model]
n_layer = 1
d_model = 32
n_head = 2
d_ff = 64
[pretrain.train]
steps = 6
batch_size = 2
save_every = 3
eval_every = 0
eval_batches = 2
dtype = "float32"
[sft]
[sft.finetune]
method = "full"
[sft.train]
steps = 4
batch_size = 2
seq_len = 256
warmup_steps = 1
save_every = 2
eval_every = 0
dtype = "float32"
[dpo]
[dpo.finetune]
method = "lora"
[dpo.train]
steps = 4
batch_size = 2
seq_len = 256
warmup_steps = 1
save_every = 2
eval_every = 0
dtype = "float32"
[eval]
max_bytes = 1500
samples = 1
"""


def tiny_recipe(tmp_path: Path, name: str = "run") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(out=tmp_path / name))
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny recipe run once, uninterrupted: the reference for the tests below."""
    tmp = tmp_path_factory.mktemp("pipeline")
    assert main(["run", str(tiny_recipe(tmp)), "--json"]) == 0
    return tmp / "run"


def test_every_stage_leaves_its_folder_and_fingerprint(finished: Path) -> None:
    for stage in ("corpus", "tokenizer", "pretrain", "sft", "dpo", "eval"):
        record = pipeline._read_json(finished / stage / "stage.json")
        assert record["stage"] == stage and len(record["fingerprint"]) == 64 and record["wall_s"] > 0
    results = pipeline._read_json(finished / "eval" / "results.json")
    assert set(results["stages"]) == {"base", "sft", "dpo"}
    for row in results["stages"].values():
        assert 0 <= row["accuracy"] <= 1 and row["val_bpb"] > 0
        assert set(row["tasks"]) == {"who_says", "first_speaker", "last_speaker"}
    for name, before in (("sft", "base"), ("dpo", "sft")):  # each stage tested against the one before, paired
        change = results["stages"][name]["vs_previous"]
        assert change["stage"] == before and 0 <= change["p_value"] <= 1
        accuracies = results["stages"][name]["accuracy"] - results["stages"][before]["accuracy"]
        assert change["change"] == pytest.approx(accuracies) and change["gained"] + change["lost"] <= results["heldout"]
    assert "vs_previous" not in results["stages"]["base"]
    assert (finished / "model" / "config.toml").is_file()


def test_the_play_tasks_carry_the_text_licence_into_the_model(finished: Path, tmp_path: Path) -> None:
    """The conversations and pairs made from the bundled play are credited to it, under its licence, in every
    fine-tuned model's lineage and in the model card (not "licence not recorded", not "unknown")."""
    from nomoat.card import training_data, write_model_card

    sources = training_data(lineage(finished / "model"))
    assert [s["stage"] for s in sources] == ["pretraining", "fine-tuning (full)", "fine-tuning (lora)"]  # merged
    assert all(s["license"].startswith("public domain") for s in sources), sources
    assert [s["name"] for s in sources[1:]] == ["sft.jsonl", "dpo.jsonl"]
    write_model_card(finished / "model", tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert 'license: "other"' in card and 'license_name: "public-domain"' in card
    tampered = finished.parent / "tampered"  # a file changed since its datasheet was written is not credited
    shutil.copytree(finished / "corpus" / "tasks", tampered)
    with (tampered / "sft.jsonl").open("a") as f:
        f.write("\n")
    assert source_of(tampered / "sft.jsonl", file_sha256(tampered / "sft.jsonl")) is None
    assert source_of(tampered / "dpo.jsonl", file_sha256(tampered / "dpo.jsonl"))["license"].startswith("public")


def test_rerun_skips_done_stages_and_a_change_reruns_from_there(finished: Path, tmp_path: Path, capsys) -> None:
    recipe = finished.parent / "run.toml"
    before = weights(finished)
    assert main(["run", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert err.count("up to date") == 6 and "starting" not in err
    assert all(torch.equal(before[k], v) for k, v in weights(finished).items())
    assert main(["run", str(recipe), "--sft.train.steps", "3"]) == 0
    err = capsys.readouterr().err
    for stage in ("corpus", "tokenizer", "pretrain"):
        assert f"[{stage}] up to date" in err
    for stage in ("sft", "dpo", "eval"):
        assert f"[{stage}] starting" in err
    assert main(["run", str(recipe), "--from", "eval"]) == 0  # steps back to 4: sft and dpo rerun too
    assert all(torch.equal(before[k], v) for k, v in weights(finished).items())


INTERRUPTS = {
    "corpus": ("write_play_tasks", None),
    "tokenizer": ("build_shards", None),
    "pretrain": ("train_step", 4),
    "sft": ("train_step", 3),
    "dpo": ("train_step", 3),
    "eval": ("score", None),
}


def interrupt_in(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next run of `stage` be interrupted: a KeyboardInterrupt inside it, or for a training stage a
    SIGINT during its n-th step, as a user's Ctrl-C (the loop saves at the end of that step and stops)."""
    import nomoat.data
    import nomoat.eval.play_tasks
    import nomoat.train

    name, at = INTERRUPTS[stage]
    module = {"write_play_tasks": pipeline, "build_shards": nomoat.data, "score": nomoat.eval.play_tasks}
    target = module.get(name, nomoat.train)
    real, real_runner, calls = getattr(target, name), pipeline.RUNNERS[stage], []

    def interrupting(*args, **kwargs):
        calls.append(1)
        if at is None:
            raise KeyboardInterrupt
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    def runner(p, folder):  # only this stage's calls count
        setattr(target, name, interrupting)
        try:
            return real_runner(p, folder)
        finally:
            setattr(target, name, real)

    monkeypatch.setitem(pipeline.RUNNERS, stage, runner)


def test_interrupt_in_every_stage_then_rerun_gives_the_same_weights(finished: Path, tmp_path: Path, monkeypatch):
    """Ctrl-C once in each stage in turn; each rerun goes on from there, and the end matches bit for bit."""
    recipe = tiny_recipe(tmp_path)
    for stage in INTERRUPTS:
        with monkeypatch.context() as m:
            interrupt_in(stage, m)
            assert main(["run", str(recipe)]) == 128 + signal.SIGINT, stage
        assert pipeline._read_json(tmp_path / "run" / stage / "stage.json") == {}, f"{stage} marked done"
        assert pipeline._read_json(tmp_path / "run" / stage / "started.json"), f"{stage} never started"
    assert main(["run", str(recipe)]) == 0
    reference, resumed = weights(finished), weights(tmp_path / "run")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[corpus]\nfiles = ["a.txt"]\n[finetuning]\n', "unknown config key 'finetuning'"),
        ('[corpus]\nfiles = ["a.txt"]\nvocab = 3\n', "unknown config key 'corpus.vocab'"),
        ("[pretrain.train]\nstep = 3\n", "unknown config key 'pretrain.train.step'"),
        ("[pretrain.train]\nsteps = -1\n", "train.steps"),
        ("[corpus]\n", "set either files or recipe"),
        ('[corpus]\nfiles = ["a.txt"]\n[tokenizer]\n', "corpus.files: "),  # named before any stage starts
        ("[sft]\ndata = 'chats.jsonl'\nbase = 'b'\n", "sft.base: "),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path: Path, capsys, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'out_dir = "{tmp_path / "out"}"\n' + text)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    if message.endswith(": "):
        assert err.endswith(": no such file or folder") and capsys.readouterr().out == ""


def test_unknown_stage_for_from_and_missing_recipe(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tiny_recipe(tmp_path)), "--from", "pretraining"]) == 2
    assert "--from 'pretraining': unknown stage" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.toml")]) == 2
    assert "no such file or bundled recipe" in capsys.readouterr().err


def test_recipes_round_trip_to_toml(tmp_path: Path) -> None:
    for name in ("chat-demo", "gpt2-chat"):
        recipe = load_run_recipe(name)
        again = parse_run_recipe(recipe_dict(recipe), Path("."))
        assert again == recipe


def test_gpu_recipe_dry_runs_on_cpu_with_tiny_overrides(tmp_path: Path) -> None:
    """The GPT-2-scale recipe, its shape and settings kept, only sizes and steps shrunk to run here."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(pipeline.BUILTIN_TEXT.read_text()[:60_000])
    tiny = {
        "out_dir": str(tmp_path / "gpt2"),
        "corpus.files": f'["{corpus}"]',
        "tokenizer.vocab_size": "300",
        "pretrain.model.n_layer": "1",
        "pretrain.model.d_model": "32",
        "pretrain.model.n_head": "2",
        "pretrain.model.d_ff": "64",
        "pretrain.model.max_seq_len": "64",
        "pretrain.train.steps": "2",
        "pretrain.train.batch_size": "2",
        "pretrain.train.seq_len": "64",
        "pretrain.train.grad_accum": "1",
        "pretrain.train.eval_batches": "1",
        "pretrain.train.device": "cpu",
        "pretrain.train.dtype": "float32",
        "pretrain.train.compile": "false",
    }
    recipe = load_run_recipe("gpt2-chat", tiny)
    assert recipe.sft is not None and recipe.dpo is not None
    recipe = parse_run_recipe({k: v for k, v in recipe_dict(recipe).items() if k not in ("sft", "dpo")}, Path("."))
    pipeline.run_recipe(recipe, progress=False)
    assert (tmp_path / "gpt2" / "model" / "model.safetensors").is_file()


def test_pretrain_without_tokenizer_stage_is_an_error(tmp_path: Path) -> None:
    raw = {"out_dir": str(tmp_path / "x"), "pretrain": {"config": "cpu"}}
    with pytest.raises(UserError, match="needs a \\[tokenizer\\] stage"):
        pipeline.run_recipe(parse_run_recipe(raw, tmp_path), progress=False)


def test_out_sets_the_run_folder(tmp_path: Path, capsys) -> None:
    assert main(["run", "chat-demo", "--out", str(tmp_path / "elsewhere"), "--corpus.files", '["nope.txt"]']) == 2
    assert "corpus.files: nope.txt: no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()  # inputs are checked before anything is written
    (tmp_path / "prose.txt").write_text("No speeches here, only prose.\n")
    assert (
        main(["run", "chat-demo", "--out", str(tmp_path / "elsewhere"), "--corpus.files", f'["{tmp_path}/prose.txt"]'])
        == 2
    )
    assert "too few speeches" in capsys.readouterr().err
    assert (tmp_path / "elsewhere" / "recipe.toml").is_file()
