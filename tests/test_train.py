"""Training: loss falls, bit-identical resume, and the errors that stop a run early."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from nomoat.checkpoint import list_checkpoints
from nomoat.cli import main
from nomoat.config import from_dict, load_config, read_toml, replace
from nomoat.data import build_shards
from nomoat.errors import UserError
from nomoat.model import Transformer
from nomoat.tokenizer import train_tokenizer
from nomoat.train import TrainingInterrupted, train, vocab_from_tokenizer

SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_loss_falls_and_run_folder_is_complete(shakespeare_shards, tmp_path):
    cfg = tiny_run(shakespeare_shards, tmp_path / "run", steps=60, eval_every=30, save_every=30, keep_last=1)
    result = train(cfg, progress=False)
    curve = losses(tmp_path / "run")
    assert len(curve) == 60
    first, last = sum(v for _, v in curve[:5]) / 5, sum(v for _, v in curve[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert result.val_bpb is not None and result.val_bpb < 8.0
    assert (tmp_path / "run/loss.png").stat().st_size > 1000
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000060"]  # keep_last=1
    files = {p.name for p in result.checkpoint.iterdir()}
    assert files == {"model.safetensors", "config.toml", "tokenizer.json", "manifest.json", "trainer.pt", "state"}


def test_grad_accumulation_matches_a_bigger_batch(shakespeare_shards, tmp_path):
    """Two micro-batches of 2 give the step of one batch of 4 when the loader hands out the same rows."""
    one = train(tiny_run(shakespeare_shards, tmp_path / "a", steps=1, batch_size=4), progress=False)
    two = train(tiny_run(shakespeare_shards, tmp_path / "b", steps=1, batch_size=2, grad_accum=2), progress=False)
    assert one.step == two.step == 1
    assert abs(one.train_loss - two.train_loss) < 1.0  # same scale: the accumulated loss is a mean, not a sum


@pytest.mark.parametrize(("optimizer", "dropout"), [("adamw", 0.0), ("muon", 0.1)])
def test_resume_is_bit_identical(shakespeare_shards, tmp_path, optimizer, dropout):
    full = tmp_path / "full"
    cfg = replace(
        tiny_run(shakespeare_shards, full, steps=20, save_every=10, optimizer=optimizer), model={"dropout": dropout}
    )
    train(cfg, progress=False)
    half = tmp_path / "half"
    shutil.copytree(full, half)
    shutil.rmtree(half / "checkpoints/step_00000020")  # as if the run had died after step 10's checkpoint
    cfg = replace(cfg, train={"out_dir": str(half)})
    result = train(cfg, resume=True, progress=False)
    assert result.step == 20
    assert losses(half) == losses(full)  # exact float equality, step by step
    a = torch.load(full / "checkpoints/step_00000020/trainer.pt", weights_only=True)
    b = torch.load(half / "checkpoints/step_00000020/trainer.pt", weights_only=True)
    assert a["loader"] == b["loader"]
    x, y = _train_state(full, tmp_path / "a.pt"), _train_state(half, tmp_path / "b.pt")
    assert x.keys() == y.keys() and len(x) > 10
    assert all(torch.equal(x[k], y[k]) for k in x)  # model and optimizer moments, bit for bit
    kind = "momentum_buffer" if optimizer == "muon" else "exp_avg_sq"
    assert any(k.endswith(f"layers.0.mlp.down_proj.weight.{kind}") for k in x), sorted(x)[:5]


def _train_state(run: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors of the last checkpoint's state/, flattened to dotted names."""
    dcp_to_torch_save(run / "checkpoints/step_00000020/state", scratch)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(scratch, weights_only=True))
    return flat


def test_resume_with_a_different_model_is_refused(shakespeare_shards, tmp_path):
    train(tiny_run(shakespeare_shards, tmp_path, steps=10), progress=False)
    cfg = replace(tiny_run(shakespeare_shards, tmp_path, steps=20), model={"d_ff": 96})
    with pytest.raises(UserError, match=r"different model config \(model.d_ff: 64 -> 96\)"):
        train(cfg, resume=True, progress=False)


def test_run_folder_guards(shakespeare_shards, tmp_path):
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train(tiny_run(shakespeare_shards, tmp_path / "empty"), resume=True, progress=False)
    train(tiny_run(shakespeare_shards, tmp_path / "done", steps=10), progress=False)
    with pytest.raises(UserError, match="already holds checkpoints"):
        train(tiny_run(shakespeare_shards, tmp_path / "done", steps=10), progress=False)


def test_tokenizer_must_match_shards_and_model(shakespeare_shards, tmp_path):
    other = train_tokenizer(["a completely different corpus of text " * 50], vocab_size=300)
    other.save(tmp_path / "other.json")
    cfg = replace(tiny_run(shakespeare_shards, tmp_path / "r"), data={"tokenizer": str(tmp_path / "other.json")})
    with pytest.raises(UserError, match="other.json"):
        train(cfg, progress=False)
    small = replace(tiny_run(shakespeare_shards, tmp_path / "r"), model={"vocab_size": 100})
    with pytest.raises(UserError, match="more than model.vocab_size 100"):
        train(small, progress=False)


def test_missing_shards_are_named(shakespeare_shards, tmp_path):
    cfg = replace(tiny_run(shakespeare_shards, tmp_path / "r"), data={"shards": str(tmp_path / "nowhere")})
    with pytest.raises(UserError, match="nowhere"):
        train(cfg, progress=False)


def test_activation_checkpointing_changes_memory_not_math(shakespeare_shards, tmp_path):
    plain = train(tiny_run(shakespeare_shards, tmp_path / "a", steps=5, eval_every=0), progress=False)
    recomputed = tiny_run(shakespeare_shards, tmp_path / "b", steps=5, eval_every=0, activation_checkpointing=True)
    train(recomputed, progress=False)
    assert losses(tmp_path / "b") == losses(plain.run_dir)


def test_metrics_report_throughput_flops_and_elapsed_time(shakespeare_shards, tmp_path):
    train(tiny_run(shakespeare_shards, tmp_path, steps=3, eval_every=2, warmup_steps=2), progress=False)
    every = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in every if "loss" in r]
    assert len(rows) == 3 and all(r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 for r in rows)
    tc = tiny_run(shakespeare_shards, tmp_path).train
    assert all(r["tokens"] == tc.batch_size * tc.seq_len * tc.grad_accum for r in rows)  # logged every step
    times = [r["elapsed_s"] for r in every]  # every row: the start, train steps and validations
    assert len(times) == 6 and times == sorted(times) and times[-1] > 0
    assert every[0] == {"step": 0, "elapsed_s": 0.0, "dtype": "float32", "dtype_reason": "set by train.dtype"}
    assert all("mfu" not in r for r in rows)  # a CPU has no entry in the peak table: achieved FLOP/s only


@pytest.mark.slow  # Inductor compiles each block's forward and backward: tens of seconds on 2 cores
def test_compiled_blocks_train_like_eager_and_save_the_same_names(shakespeare_shards, tmp_path):
    eager = train(tiny_run(shakespeare_shards, tmp_path / "a", steps=3, eval_every=0), progress=False)
    compiled = train(tiny_run(shakespeare_shards, tmp_path / "b", steps=3, eval_every=0, compile=True), progress=False)
    a, b = [v for _, v in losses(eager.run_dir)], [v for _, v in losses(compiled.run_dir)]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    names = [load_file(str(r.checkpoint / "model.safetensors")).keys() for r in (eager, compiled)]
    assert names[0] == names[1]


def test_a_bad_eval_task_file_stops_the_run_before_training(shakespeare_shards, tmp_path):
    cfg = tiny_run(shakespeare_shards, tmp_path / "run", eval_tasks=("piqa=" + str(tmp_path / "missing.jsonl"),))
    with pytest.raises(UserError, match="missing.jsonl"):
        train(cfg, progress=False)
    assert not list_checkpoints(tmp_path / "run")


def test_auto_precision_is_recorded_and_kept_on_resume(shakespeare_shards, tmp_path, monkeypatch):
    """A CPU's `auto` is settled once (here: no native bf16, so fp32 unprobed), logged, and saved with the
    checkpoint; a resumed run keeps the saved choice even where this machine would now choose otherwise."""
    monkeypatch.setattr("nomoat.device.cpu_flags", lambda: {"avx2"})
    cfg = tiny_run(shakespeare_shards, tmp_path, steps=4, save_every=2, eval_every=0, dtype="auto")
    train(cfg, progress=False)
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["dtype"] == "float32" and "no native bf16" in first["dtype_reason"]
    ckpt = list_checkpoints(tmp_path)[-1]
    assert torch.load(ckpt / "trainer.pt", weights_only=True)["decisions"]["dtype"] == "float32"
    shutil.rmtree(ckpt)
    monkeypatch.setattr("nomoat.device.choose_precision", lambda *a: pytest.fail("resume must not re-decide"))
    train(cfg, resume=True, progress=False)


def test_time_budget_fixes_the_steps_records_them_and_resumes_exactly(shakespeare_shards, tmp_path):
    full = tmp_path / "full"
    cfg = tiny_run(shakespeare_shards, full, steps=5, time_budget=3.0, save_every=8, keep_last=0, eval_every=0)
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    [decided] = [r for r in rows if "steps_reason" in r]
    assert decided["step"] >= 11 and decided["elapsed_s"] >= 0.05 * 3.0  # 10 steps and 5% of the budget timed
    assert "time_budget 3s" in decided["steps_reason"]
    steps = decided["steps"]
    assert result.step == steps > decided["step"] + 8  # train.steps (5) gave way to the budget
    assert [r["lr"] for r in rows if "lr" in r][-1] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=0.05)
    last = list_checkpoints(full)[-1]
    assert torch.load(last / "trainer.pt", weights_only=True)["decisions"]["steps"] == steps
    half = tmp_path / "half"
    shutil.copytree(full, half)
    after = [c for c in list_checkpoints(half) if int(c.name.removeprefix("step_")) > decided["step"]]
    for ckpt in after[1:]:  # as if the run had died at the first checkpoint after the decision
        shutil.rmtree(ckpt)
    resumed = train(replace(cfg, train={"out_dir": str(half)}), resume=True, progress=False)
    assert resumed.step == steps and losses(half) == losses(full)  # the same schedule, step for step


def saved_config(run: Path):
    ckpt = list_checkpoints(run)[-1]
    return from_dict(read_toml(ckpt / "config.toml"))


def test_a_presets_vocabulary_follows_the_tokenizer(shakespeare_shards):
    cfg = load_config("cpu", {"data.tokenizer": str(shakespeare_shards[1])})  # 2048 rows for 320 tokens
    fitted, line = vocab_from_tokenizer(cfg)
    assert fitted.model.vocab_size == 320 and line is not None and "not the config's 2048" in line
    assert vocab_from_tokenizer(fitted) == (fitted, None)
    assert vocab_from_tokenizer(replace(cfg, model={"vocab_size": 300}))[0].model.vocab_size == 320


def test_the_cli_sizes_a_presets_vocabulary_for_the_tokenizer_unless_told(tmp_path, capsys):
    """The README's tour: an 8192-token tokenizer with the 2048-token `cpu` preset. Here 2,100 tokens."""
    text = SHAKESPEARE.read_text()[:100_000]
    (tmp_path / "train.txt").write_text(text[:90_000])
    (tmp_path / "val.txt").write_text(text[90_000:])
    tok = train_tokenizer([text[:90_000]], vocab_size=2100)
    tok.save(tmp_path / "tok.json")
    build_shards([tmp_path / "train.txt"], tok, tmp_path / "shards", val_inputs=[tmp_path / "val.txt"], progress=False)
    args = ["train", "--config", "cpu", "--data.shards", str(tmp_path / "shards"), "--data.tokenizer",
            str(tmp_path / "tok.json"), "--train.steps", "1", "--train.batch_size", "2", "--train.seq_len", "32",
            "--train.eval_batches", "1", "--train.dtype", "float32", "--json"]  # fmt: skip
    assert main([*args, "--train.out_dir", str(tmp_path / "a")]) == 0
    assert f"model.vocab_size 2112 for the tokenizer's {tok.vocab_size:,} tokens" in capsys.readouterr().err
    assert saved_config(tmp_path / "a").model.vocab_size == 2112  # rounded up to a multiple of 64
    assert main([*args, "--train.out_dir", str(tmp_path / "b"), "--model.vocab_size", "2048"]) == 2
    assert "more than model.vocab_size 2048" in capsys.readouterr().err  # the user's own choice stands
    own = tmp_path / "own.toml"  # ... also in a TOML of their own
    own.write_text((Path(__file__).parents[1] / "nomoat/presets/cpu.toml").read_text())
    assert main([*args[:2], str(own), *args[3:], "--train.out_dir", str(tmp_path / "c")]) == 2
    assert "more than model.vocab_size 2048" in capsys.readouterr().err


def test_a_warmup_longer_than_the_run_is_cut_with_a_warning(shakespeare_shards, tmp_path):
    """The default 100 warm-up steps in a 30-step fine-tune left the rate at a third of its peak."""
    cfg = tiny_run(shakespeare_shards, tmp_path, steps=10, warmup_steps=100, schedule="constant", eval_every=0)
    with pytest.warns(UserWarning, match=r"warmup_steps 100 would not end within the run's 10 steps: .* over 1 "):
        train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [cfg.train.lr] * 10  # warmed up in one step, then the peak
    assert rows[0]["warmup_steps"] == 1 and "would not end" in rows[0]["warmup_reason"]
    assert saved_config(tmp_path).train.warmup_steps == 1  # what ran, so that a resumed run keeps it


def test_a_checkpoints_config_resumes_from_any_directory(shakespeare_shards, tmp_path, monkeypatch):
    """Relative paths are saved absolute; the checkpoint's own tokenizer serves when the original has moved."""
    work = tmp_path / "work"
    shutil.copytree(shakespeare_shards[0], work / "shards")
    (work / "tok").mkdir()
    shutil.copy(shakespeare_shards[1], work / "tok/tokenizer.json")
    monkeypatch.chdir(work)
    cfg = tiny_run((Path("shards"), Path("tok/tokenizer.json")), Path("runs/b"), steps=6, save_every=3, eval_every=3)
    train(cfg, progress=False)
    full = losses(work / "runs/b")
    shutil.rmtree(work / "runs/b/checkpoints/step_00000006")  # as if the run had died after step 3
    (work / "tok/tokenizer.json").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = work / "runs/b/checkpoints/step_00000003/config.toml"
    assert main(["train", "--config", str(config), "--resume", "--json"]) == 0
    assert losses(work / "runs/b") == full and not list(elsewhere.iterdir())
    assert saved_config(work / "runs/b").data.shards == str(work / "shards")


def test_ctrl_c_during_validation_stops_it_saves_and_resumes(shakespeare_shards, tmp_path, monkeypatch, capsys):
    full = tiny_run(shakespeare_shards, tmp_path / "full", steps=6, eval_every=3, save_every=6)
    train(full, progress=False)
    cfg = replace(full, train={"out_dir": str(tmp_path / "cut")})
    finished = []

    def slow_validation(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while validating
        time.sleep(30)
        finished.append(True)

    monkeypatch.setattr("nomoat.train.evaluate_loss", slow_validation)
    start = time.perf_counter()
    with pytest.raises(TrainingInterrupted) as stopped:
        train(cfg, progress=True)
    assert time.perf_counter() - start < 20 and not finished
    assert stopped.value.checkpoint == tmp_path / "cut/checkpoints/step_00000003"
    err = capsys.readouterr().err
    params = sum(p.numel() for p in Transformer(cfg.model).parameters())
    assert f"model: 2 layers x 32, {params:,} parameters; 128 tokens per step (4 x 32 x 1 accumulated)" in err
    monkeypatch.undo()
    train(cfg, resume=True, progress=False)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
