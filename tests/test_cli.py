"""The `nomoat` command end to end: --json outputs, one-line errors with exit status 2, SIGINT then --resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SHAKESPEARE, tiny_run

from nomoat.cli import main
from nomoat.config import to_toml


def nomoat(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nomoat.cli", *args], capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nomoat: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_run(shards, out_dir: Path, path: Path, **train) -> Path:
    path.write_text(to_toml(tiny_run(shards, out_dir, **train)))
    return path


def test_the_whole_loop_through_the_cli(tmp_path):
    text = SHAKESPEARE.read_text()[:60_000]
    (tmp_path / "train.txt").write_text(text[:54_000])
    (tmp_path / "val.txt").write_text(text[54_000:])
    tok = last_json(
        nomoat(
            "tokenizer",
            "train",
            str(tmp_path / "train.txt"),
            "--vocab-size",
            "320",
            "--out",
            str(tmp_path / "tok.json"),
            "--json",
        )
    )
    assert tok["vocab_size"] == 320
    built = last_json(
        nomoat(
            "data",
            "build",
            str(tmp_path / "train.txt"),
            "--val",
            str(tmp_path / "val.txt"),
            "--tokenizer",
            str(tmp_path / "tok.json"),
            "--out",
            str(tmp_path / "shards"),
            "--json",
        )
    )
    assert built["train_tokens"] > 10_000 and built["val_tokens"] > 1_000
    shards = (tmp_path / "shards", tmp_path / "tok.json")
    run = write_run(shards, tmp_path / "run", tmp_path / "run.toml")
    trained = last_json(nomoat("train", "--config", str(run), "--train.steps", "12", "--train.lr=2e-3", "--json"))
    assert trained["step"] == 12 and trained["val_bpb"] > 0 and trained["tokens_per_s"] > 0
    sample = last_json(
        nomoat(
            "generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "8", "--seed", "1", "--json"
        )
    )
    assert isinstance(sample["text"], str) and sample["tokens"] > 0
    assert sample["prefill_tokens_per_s"] > 0 and sample["decode_tokens_per_s"] > 0
    assert sample["first_token_seconds"] > 0
    scored = last_json(nomoat("eval", str(tmp_path / "run"), "--shards", str(tmp_path / "shards"), "--json"))
    assert scored["val_bpb"] == pytest.approx(trained["val_bpb"], rel=0.2)
    int8 = last_json(nomoat("eval", str(tmp_path / "run"), "--shards", str(tmp_path / "shards"), "--quantize", "int8",
                            "--json"))  # fmt: skip
    assert int8["val_bpb"] == pytest.approx(scored["val_bpb"], rel=0.01)
    quick = last_json(nomoat("generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "8",
                             "--quantize", "int8", "--compile", "--json"))  # fmt: skip
    assert quick["compile_seconds"] > 0 and quick["decode_tokens_per_s"] > 0


def test_bad_input_gets_one_line_and_status_2(shakespeare_shards, tmp_path):
    tok = str(shakespeare_shards[1])
    assert_one_line_error(
        nomoat(
            "data", "build", str(tmp_path / "nope.txt"), "--tokenizer", tok, "--out", str(tmp_path / "o"), check_rc=None
        ),
        "nope.txt",
    )
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(
        nomoat(
            "data",
            "build",
            str(tmp_path / "empty.txt"),
            "--tokenizer",
            tok,
            "--out",
            str(tmp_path / "o"),
            check_rc=None,
        ),
        "empty",
    )
    run = write_run(shakespeare_shards, tmp_path / "run", tmp_path / "run.toml")
    assert_one_line_error(
        nomoat("train", "--config", str(run), "--train.lrr", "1", check_rc=None), "did you mean 'train.lr'"
    )
    assert_one_line_error(
        nomoat("train", "--config", str(run), "--model.n_layer", "two", check_rc=None), "model.n_layer"
    )
    assert_one_line_error(nomoat("generate", str(tmp_path / "nothing"), "--prompt", "hi", check_rc=None), "nothing")
    debug = nomoat("--debug", "generate", str(tmp_path / "nothing"), "--prompt", "hi", check_rc=None)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_corrupt_shard_and_wrong_tokenizer_are_named(shakespeare_shards, tmp_path):
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(shakespeare_shards[0], shards)
    data = bytearray((shards / "train_000000.bin").read_bytes())
    data[100] ^= 0xFF
    (shards / "train_000000.bin").write_bytes(bytes(data))
    run = write_run((shards, shakespeare_shards[1]), tmp_path / "run", tmp_path / "run.toml")
    assert_one_line_error(nomoat("train", "--config", str(run), check_rc=None), "train_000000.bin")
    (shards / "train_000000.bin").write_bytes(bytes(data[:-10]))
    assert_one_line_error(nomoat("train", "--config", str(run), check_rc=None), "train_000000.bin")


def test_resume_with_another_model_config_is_refused(shakespeare_shards, tmp_path):
    run = write_run(shakespeare_shards, tmp_path / "run", tmp_path / "run.toml", steps=4)
    nomoat("train", "--config", str(run))
    assert_one_line_error(
        nomoat("train", "--config", str(run), "--resume", "--model.d_ff", "96", check_rc=None), "model.d_ff"
    )


def test_sigint_saves_and_resume_continues_bit_identically(shakespeare_shards, tmp_path):
    steps = {"steps": 1000, "save_every": 0, "eval_every": 0}
    reference = write_run(shakespeare_shards, tmp_path / "ref", tmp_path / "ref.toml", **steps)
    nomoat("train", "--config", str(reference))

    run = write_run(shakespeare_shards, tmp_path / "run", tmp_path / "run.toml", **steps)
    proc = subprocess.Popen(
        [sys.executable, "-m", "nomoat.cli", "train", "--config", str(run)], stderr=subprocess.PIPE, text=True
    )
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 20):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    nomoat("train", "--config", str(run), "--resume")
    assert metrics.read_text() != ""
    ours = [(r["step"], r["loss"]) for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    ref = [
        (r["step"], r["loss"])
        for r in map(json.loads, (tmp_path / "ref/metrics.jsonl").read_text().splitlines())
        if "loss" in r
    ]
    assert ours == ref


def test_usage_mistakes_get_one_line_and_status_2(capsys):
    assert main(["train", "--bogus-flag"]) == 2
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("nomoat: error: ") for line in err), err
    assert "--config" in err[0] and "invalid choice: 'no-such-command'" in err[1]


def test_a_negative_token_count_is_one_line(shakespeare_shards, tmp_path: Path) -> None:
    proc = nomoat("generate", str(tmp_path / "nowhere"), "--prompt", "x", check_rc=None)
    assert_one_line_error(proc, "no such checkpoint")
    run = tmp_path / "run"
    main(["train", "--config", str(write_run(shakespeare_shards, run, tmp_path / "r.toml", steps=2)), "--json"])
    assert_one_line_error(nomoat("generate", str(run), "--prompt", "x", "--max-new-tokens", "-3", check_rc=None),
                          "max_new_tokens must be 0 or more, got -3")  # fmt: skip


def test_tokenizer_train_and_data_build_refuse_a_folder_without_text_alike(shakespeare_shards, tmp_path, capsys):
    """Both read the same files (data.formats.corpus_files): a folder of .py files or an empty folder is one line
    naming it and what was looked for, exit 2, and no tokenizer is written."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code/train.py").write_text("print('not a corpus')\n")
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "code", tmp_path / "empty"):
        out = tmp_path / "tok/tokenizer.json"
        assert main(["tokenizer", "train", str(folder), "--vocab-size", "300", "--out", str(out)]) == 2
        assert main(["data", "build", str(folder), "--tokenizer", str(shakespeare_shards[1]), "--out",
                     str(tmp_path / "shards")]) == 2  # fmt: skip
        tokenizer_line, data_line = capsys.readouterr().err.splitlines()
        assert tokenizer_line == data_line, (tokenizer_line, data_line)
        assert tokenizer_line.startswith(f"nomoat: error: no documents in {folder}: ") and ".txt, .jsonl" in data_line
        assert not out.exists()


def test_demo_ctrl_c_is_one_line_and_json_keeps_progress_on_stderr(tmp_path, monkeypatch, capsys):
    """Ctrl-C in the demo's training (train raises TrainingInterrupted once its checkpoint is saved) ends with one
    line naming the checkpoint and how to go on, exit 130; --json still shows progress on stderr, and stdout gets
    nothing but the JSON (here: nothing, as the demo stopped)."""
    from nomoat.train import TrainingInterrupted

    small = tmp_path / "small.txt"
    small.write_text(SHAKESPEARE.read_text()[:60_000])
    monkeypatch.setattr("nomoat.demo.CORPUS", small)
    checkpoint = tmp_path / "demo/run/checkpoints/step_00000042"

    def interrupted(cfg, progress):
        assert progress
        raise TrainingInterrupted(signal.SIGINT, checkpoint)

    monkeypatch.setattr("nomoat.demo.train", interrupted)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--json"]) == 128 + signal.SIGINT
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert "[1/4] training a 2048-token" in err and "[3/4] training" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("nomoat: demo stopped by SIGINT; checkpoint saved to ") and str(checkpoint) in last
    assert f"nomoat train --config {checkpoint / 'config.toml'} --resume" in last and "nomoat demo" in last


def test_chat_ctrl_c_stops_a_reply_and_keeps_the_conversation(shakespeare_shards, tmp_path, monkeypatch, capsys):
    """Ctrl-C during a reply (KeyboardInterrupt, as the signal raises it, at some point of the real reply's stream)
    stops it and the chat goes on with the part shown as the assistant's turn; stopped before any text, the user's
    message is withdrawn; Ctrl-C at the prompt ends the chat with status 0."""
    import builtins
    import dataclasses

    import nomoat.chat
    from nomoat.checkpoint import save_checkpoint
    from nomoat.model import Transformer
    from nomoat.tokenizer import Tokenizer

    cfg = tiny_run(shakespeare_shards, tmp_path / "run")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=512))  # room for ChatML
    save_checkpoint(tmp_path / "run", 1, Transformer(cfg.model), cfg, Tokenizer.load(shakespeare_shards[1]))
    typed = iter(["hello", "again", "third", KeyboardInterrupt])
    stop_after = iter([2, 0, None])  # pieces shown before Ctrl-C, per reply (None: none)
    seen, real = [], nomoat.chat.stream_reply

    def typing(prompt: str) -> str:
        line = next(typed)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    def replying(model, tokenizer, messages, **sampling):
        seen.append([dict(m) for m in messages])
        limit = next(stop_after)
        for i, piece in enumerate(real(model, tokenizer, messages, **{**sampling, "temperature": 1.0})):
            if i == limit:
                raise KeyboardInterrupt
            yield piece if piece.strip() else "x"  # every piece shows something

    monkeypatch.setattr(builtins, "input", typing)
    monkeypatch.setattr(nomoat.chat, "stream_reply", replying)
    assert main(["chat", str(tmp_path / "run"), "--max-new-tokens", "8", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    first = out.split(" [stopped]")[0]
    assert [m["content"] for m in seen[0]] == ["hello"]
    assert [m["content"] for m in seen[1]] == ["hello", first.strip(), "again"] and first.strip()
    assert [m["content"] for m in seen[2]] == ["hello", first.strip(), "third"]  # "again" was withdrawn
    assert out.count(" [stopped]") == 2


def test_generate_says_when_the_context_cut_it_short(shakespeare_shards, tmp_path, capsys):
    """--max-new-tokens beyond the context: the text stops at the context, and one stderr line says so."""
    import torch

    from nomoat.checkpoint import save_checkpoint
    from nomoat.model import Transformer
    from nomoat.tokenizer import Tokenizer

    cfg = tiny_run(shakespeare_shards, tmp_path / "run")  # a 64-token context
    torch.manual_seed(0)  # a model whose greedy text does not meet eos first
    save_checkpoint(tmp_path / "run", 1, Transformer(cfg.model), cfg, Tokenizer.load(shakespeare_shards[1]))
    command = ["generate", str(tmp_path / "run"), "--prompt", "ROMEO:", "--temperature", "0", "--no-compile"]
    assert main([*command, "--max-new-tokens", "100000"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nomoat: stopped at the model's context of 64 tokens"), err
    assert "before --max-new-tokens 100000" in err[0]
    assert main([*command, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "typed, message",
    [
        (["hello there  "], "hello there"),
        (["ANTONIO:\\", "What news?\\", "\\", "Who speaks first?"], "ANTONIO:\nWhat news?\n\nWho speaks first?"),
        (['"""', "ANTONIO:", "What news?", "", "Who speaks first?", '"""'],
         "ANTONIO:\nWhat news?\n\nWho speaks first?"),
        (['"""ANTONIO:', 'What news?"""'], "ANTONIO:\nWhat news?"),
        (['"""one line"""'], "one line"),
        ([""], ""),
    ],
)  # fmt: skip
def test_chat_reads_multi_line_messages(typed: list[str], message: str) -> None:
    """A backslash at the end of a line goes on to the next (llama.cpp); a block between \"\"\" lines is one
    message (Ollama); the prompts say which line is a continuation."""
    from nomoat.cli import read_message

    lines, prompts = iter(typed), []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        return next(lines)

    assert read_message(read) == message
    assert prompts == ["> ", *["... "] * (len(typed) - 1)] and next(lines, None) is None  # read all, no more


def test_chat_sends_a_pasted_passage_as_one_message(shakespeare_shards, tmp_path, monkeypatch):
    import builtins
    import dataclasses

    import nomoat.chat
    from nomoat.checkpoint import save_checkpoint
    from nomoat.model import Transformer
    from nomoat.tokenizer import Tokenizer

    cfg = tiny_run(shakespeare_shards, tmp_path / "run")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=512))
    save_checkpoint(tmp_path / "run", 1, Transformer(cfg.model), cfg, Tokenizer.load(shakespeare_shards[1]))
    typed, seen = iter(['"""', "ANTONIO:", "What news?", "", "Who speaks first?", '"""', ""]), []

    def replying(model, tokenizer, messages, **sampling):
        seen.append([m["content"] for m in messages])
        yield "ANTONIO"

    monkeypatch.setattr(builtins, "input", lambda prompt: next(typed))
    monkeypatch.setattr(nomoat.chat, "stream_reply", replying)
    assert main(["chat", str(tmp_path / "run"), "--max-new-tokens", "8"]) == 0
    assert seen == [["ANTONIO:\nWhat news?\n\nWho speaks first?"]]


def test_chat_says_when_the_context_is_full_and_goes_on(shakespeare_shards, tmp_path, monkeypatch, capsys):
    """A message that does not fit is withdrawn with one line (the chat goes on); a reply cut by the context
    says so."""
    import builtins
    import dataclasses

    import torch

    from nomoat.checkpoint import save_checkpoint
    from nomoat.model import Transformer
    from nomoat.tokenizer import Tokenizer

    cfg = tiny_run(shakespeare_shards, tmp_path / "run")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=128))
    torch.manual_seed(0)  # a model whose sampled text does not close its turn within the context
    save_checkpoint(tmp_path / "run", 1, Transformer(cfg.model), cfg, Tokenizer.load(shakespeare_shards[1]))
    typed = iter(["to be or not to be " * 40, "to be or not to be " * 10, ""])  # 359 tokens, then about 100
    monkeypatch.setattr(builtins, "input", lambda prompt: next(typed))
    command = ["chat", str(tmp_path / "run"), "--max-new-tokens", "60", "--temperature", "0", "--seed", "0"]
    assert main(command) == 0
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()[1:]  # after the how-to line
    assert lines[0].startswith("nomoat: the conversation is ") and "the model's context is 128" in lines[0]
    assert lines[1] == "nomoat: the reply stopped at the model's context of 128 tokens; /reset to start over"
    assert len(lines) == 2 and out.count("\n") >= 2  # the second message was answered
