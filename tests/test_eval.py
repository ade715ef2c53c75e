"""Language-modelling eval: bits per byte by hand, rolling windows as the harness cuts them, shards both ways, and
the `nomoat eval` command with text, tasks, results files and --compare."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nomoat.checkpoint import save_checkpoint
from nomoat.cli import main
from nomoat.config import ModelConfig, RunConfig, TrainConfig
from nomoat.data import ShardSet
from nomoat.errors import UserError
from nomoat.eval import evaluate_loss
from nomoat.eval.lm import rolling_windows
from nomoat.eval.loss import evaluate_shards, evaluate_text
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer, train_tokenizer

TEXT = "Thé quick brown fox jumps over the lazy dog; then it sleeps."  # one two-byte character


@pytest.fixture(scope="module")
def lm() -> tuple[Transformer, Tokenizer]:
    tok = train_tokenizer([TEXT * 20], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=300, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=64, norm="rmsnorm", mlp="swiglu",
        pos_emb="rope", bias=False, init="normal", init_std=0.3,
    )  # fmt: skip
    return Transformer(cfg).eval(), tok


def test_bits_per_byte_is_the_hand_computation(lm, tmp_path):
    model, tok = lm
    (tmp_path / "t.txt").write_text(TEXT)
    seq = [tok.eos_id, *tok.encode(TEXT)]
    assert len(seq) <= 64
    nats = F.cross_entropy(model(torch.tensor([seq[:-1]]))[0], torch.tensor(seq[1:]), reduction="sum").item()
    result = evaluate_text(model, tok, [tmp_path / "t.txt"])
    assert len(TEXT.encode()) == len(TEXT) + 1
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / len(TEXT.encode()), rel=1e-5)
    assert result["loss"] == pytest.approx(nats / (len(seq) - 1), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # sliding windows: while the text fits the window, any stride gives the full-context loss; once it does not,
    # the first tokens of the context are cut and the loss changes
    assert evaluate_text(model, tok, [tmp_path / "t.txt"], window=64, stride=5)["loss"] == pytest.approx(result["loss"])
    cut = evaluate_text(model, tok, [tmp_path / "t.txt"], window=len(seq) // 2, stride=3)
    assert cut["tokens"] == result["tokens"] and cut["loss"] != pytest.approx(result["loss"])


def test_rolling_windows_cover_each_token_once_and_match_the_harness():
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    for n, window, stride in [(2, 8, 8), (8, 8, 8), (9, 8, 8), (50, 8, 8), (50, 8, 3), (50, 8, 1)]:
        spans = list(rolling_windows(n, window, stride))
        scored = [p for start, end, k in spans for p in range(end - k + 1, end + 1)]
        assert scored == list(range(1, n))  # positions 1..n-1, in order, once each
        assert all(0 <= start and end - start <= window for start, end, _ in spans)
        assert all(end - start == window for start, end, _ in spans[1:])  # later windows keep a full context
        # the harness's windows over the same tokens (seq = [prefix] + tokens), context_len = window - stride + 1
        seq = list(range(100, 100 + n))
        windows = get_rolling_token_windows(seq[1:], seq[0], window, window - stride + 1)
        theirs = [make_disjoint_window(w) for w in windows]
        ours = [(seq[start:end], seq[end - k + 1 : end + 1]) for start, end, k in spans]
        assert [((c + p)[-(window + 1) :][:-1], p) for c, p in theirs] == ours


def test_shards_rolling_is_the_batched_split_loss_but_for_the_last_window(lm, shakespeare_shards):
    """Both score every token but the first once, in windows of 32; the rolling last window keeps a full context
    where evaluate_loss starts a short row, so the two differ only in those last few tokens."""
    model, tok = lm
    shards = ShardSet(shakespeare_shards[0], "val")
    small = Transformer(dataclasses.replace(model.cfg, vocab_size=320)).eval()  # the shards' tokenizer
    old = evaluate_loss(small, shards, batch_size=4, seq_len=32)
    new = evaluate_shards(small, shards, window=32, stride=32)
    assert new["tokens"] == old["val_tokens"] and (shards.tokens - 1) % 32
    assert new["loss"] == pytest.approx(old["val_loss"], rel=1e-3) and new["loss"] != old["val_loss"]
    assert new["bits_per_byte"] / new["loss"] == pytest.approx(old["val_bpb"] / old["val_loss"])
    overlapping = evaluate_shards(small, shards, window=32, stride=16)
    assert overlapping["tokens"] == new["tokens"] and overlapping["loss"] != pytest.approx(new["loss"])


def test_split_loss_shows_its_progress_on_stderr(lm, shakespeare_shards, capsys):
    """A whole validation split can take minutes: its batches are counted on stderr, the total known at start."""
    model, _ = lm
    shards = ShardSet(shakespeare_shards[0], "val")
    small = Transformer(dataclasses.replace(model.cfg, vocab_size=320)).eval()
    quiet = evaluate_loss(small, shards, batch_size=4, seq_len=32, max_batches=3)
    assert capsys.readouterr().err == ""
    shown = evaluate_loss(small, shards, batch_size=4, seq_len=32, max_batches=3, progress=True)
    assert shown == quiet
    assert "validation:   0%|          | 0/3 " in capsys.readouterr().err
    evaluate_loss(small, shards, batch_size=4, seq_len=32, progress=True)  # the whole split
    n = -(-((shards.tokens - 1) // 32) // 4) + 1  # full batches, then the short last row
    assert f"| 0/{n} " in capsys.readouterr().err


def test_bad_text_inputs_name_the_line(lm, tmp_path):
    model, tok = lm
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(UserError, match=r"a.jsonl:2: missing field 'text'"):
        evaluate_text(model, tok, [tmp_path / "a.jsonl"])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(UserError, match="no text to score"):
        evaluate_text(model, tok, [tmp_path / "e.txt"])
    with pytest.raises(UserError, match="stride <= window"):
        evaluate_text(model, tok, [tmp_path / "e.txt"], window=128)


def test_cli_text_tasks_results_and_compare(lm, tmp_path, capsys):
    model, tok = lm
    ckpt = save_checkpoint(tmp_path / "run", 0, model, RunConfig(model=model.cfg, train=TrainConfig(seq_len=32)), tok)
    (tmp_path / "t.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    piqa = [{"goal": "the fox", "sol1": " jumps", "sol2": " sleeps", "label": i % 2} for i in range(4)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in piqa))
    args = ["eval", str(ckpt), "--text", str(tmp_path / "t.jsonl"), "--task", f"piqa={tmp_path / 'piqa.jsonl'}"]
    assert main([*args, "--num-fewshot", "1", "--out", str(tmp_path / "a.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert set(out["results"]) == {"text", "piqa"} and out["results"]["piqa"]["n"] == 4
    assert out["results"]["text"]["bits_per_byte"] > 0
    assert "| piqa | acc_norm |" in (tmp_path / "a.md").read_text()
    assert main([*args, "--out", str(tmp_path / "b.json")]) == 0
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out
    assert "| task | metric | a | b |" in table and "| text | bits_per_byte |" in table
    (tmp_path / "bad.jsonl").write_text(json.dumps({**piqa[0], "label": 5}) + "\n")
    assert main(["eval", str(ckpt), "--task", f"piqa={tmp_path / 'bad.jsonl'}"]) == 2
    assert "bad.jsonl:1: label 5 is out of range for 2 choices" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path / "a.json")]) == 2


def test_train_eval_tasks_are_logged_with_the_validation_loss(shakespeare_shards, tmp_path):
    from conftest import tiny_run

    from nomoat.train import train

    piqa = [{"goal": "ROMEO:", "sol1": " I", "sol2": " thou", "label": i % 2} for i in range(4)]
    (tmp_path / "piqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in piqa))
    cfg = tiny_run(shakespeare_shards, tmp_path / "run", steps=10, eval_tasks=(f"piqa={tmp_path / 'piqa.jsonl'}",))
    train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in rows if "val_loss" in r]
    assert val["step"] == 10 and 0 <= val["piqa/acc"] <= 1 and "piqa/acc_norm" in val
