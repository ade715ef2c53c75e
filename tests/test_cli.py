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
