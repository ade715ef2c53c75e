"""Fine-tuning: records to masked rows (bad input named by file and line), packing that keeps targets inside
their sample, a loader that resumes from its step, and end to end through train(): a tiny model learns to answer
and stop, LoRA checkpoints resume exactly and hold a PEFT adapter, merging reports bits per byte, CLI errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from nomoat.chat import render_chat, stream_reply
from nomoat.checkpoint import load_checkpoint, save_checkpoint
from nomoat.cli import main
from nomoat.config import FinetuneConfig, ModelConfig, RunConfig, TrainConfig
from nomoat.errors import UserError
from nomoat.finetune import IGNORE, RowLoader, build_rows, finetune, masked_loss, merge, pack
from nomoat.generate import generate_tokens
from nomoat.load import load_model
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer, train_tokenizer

CHATS = [
    ("What colour is the sky?", "Blue."),
    ("What do cows drink?", "Water, mostly."),
    ("Name a prime number.", "Seven."),
    ("Say hello.", "Hello there!"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LLaMA-style model with a tokenizer that knows ChatML's markers (the default template)."""
    root = tmp_path_factory.mktemp("ft_base")
    text = [f"{q} {a} user assistant system" for q, a in CHATS] * 8
    tok = train_tokenizer(text, 320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    cfg = ModelConfig(
        vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=64,
        norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False, init="normal",
    )  # fmt: skip
    torch.manual_seed(0)
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=64))
    return save_checkpoint(root, 0, Transformer(cfg), run, tok)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_records() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in CHATS]


def tok_of(base: Path) -> Tokenizer:
    return Tokenizer.load(base / "tokenizer.json")


def test_record_kinds_and_masks(base: Path, tmp_path: Path) -> None:
    tok = tok_of(base)
    alpaca = [{"instruction": "Say hello.", "input": "", "output": "Hello there!"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    rows, stats = build_rows(tok, tmp_path / "alpaca.json", 64)
    chat_rows, _ = build_rows(tok, write_jsonl(tmp_path / "chat.jsonl", chat_records()[3:]), 64)
    assert rows == chat_rows  # an Alpaca record is one user/assistant exchange
    x, y = rows[0]
    assert tok.decode([t for t in y if t != IGNORE]) == "Hello there!<|im_end|>\n<|endoftext|>"
    assert x[: y.index(next(t for t in y if t != IGNORE)) + 1] == tok.encode(
        render_chat(tok, chat_records()[3]["messages"][:1])
    )
    assert stats.records == 1 and stats.rows == 1
    text_rows, _ = build_rows(tok, write_jsonl(tmp_path / "t.jsonl", [{"text": "Blue sky"}]), 64)
    assert all(t != IGNORE for t in text_rows[0][1]) and text_rows[0][1][-1] == tok.eos_id
    (tmp_path / "book.txt").write_text("What colour is the sky? Blue. " * 40)
    book, stats = build_rows(tok, tmp_path / "book.txt", 16)
    assert stats.truncated == 0 and len(book) > 4 and all(len(x) <= 16 for x, _ in book)


def test_overlong_samples_are_truncated_or_dropped_and_counted(base: Path, tmp_path: Path) -> None:
    tok = tok_of(base)
    records = chat_records() + [
        {"messages": [{"role": "user", "content": "Say hello. " * 30}, {"role": "assistant", "content": "Hi."}]}
    ]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    _, stats = build_rows(tok, path, 32, overlong="truncate")
    assert (stats.truncated, stats.dropped_overlong, stats.dropped_unscored, stats.rows) == (1, 0, 1, 4)
    _, stats = build_rows(tok, path, 32, overlong="drop")
    assert (stats.truncated, stats.dropped_overlong, stats.rows) == (0, 1, 4)
    assert "1 dropped as over-long" in stats.line()


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (['{"text": "fine"}', "{not json"], r"d\.jsonl:2: not valid JSON"),
        (['{"messages": [{"role": "bot", "content": "x"}]}'], r"d\.jsonl:1: message 0: unknown role 'bot'"),
        (
            ['{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}'],
            r":1: message 1: role 'user' out of order",
        ),
        (['{"prompt": "x"}'], r"d\.jsonl:1: a record needs 'messages'.*\(it has: prompt\)"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], r":1: the conversation has no assistant turn"),
    ],
)
def test_bad_records_are_named_with_file_and_line(base: Path, tmp_path: Path, lines: list[str], error: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=error):
        build_rows(tok_of(base), path, 64)


def test_template_render_errors_are_named(base: Path, tmp_path: Path) -> None:
    tok = tok_of(base)
    tok.chat_template = "{{ raise_exception('only one turn, please') }}"
    with pytest.raises(UserError, match=r"d\.jsonl:1: the chat template failed to render.*only one turn"):
        build_rows(tok, write_jsonl(tmp_path / "d.jsonl", chat_records()), 64)


def test_nothing_to_learn_is_an_error(base: Path, tmp_path: Path) -> None:
    tok = tok_of(base)
    long = {"messages": [{"role": "user", "content": "Say hello. " * 40}, {"role": "assistant", "content": "Hi."}]}
    with pytest.raises(UserError, match="no sample has a token to learn from.*1 dropped with nothing to learn"):
        build_rows(tok, write_jsonl(tmp_path / "d.jsonl", [long]), 24)
    loader = RowLoader([([1, 2, 3], [IGNORE, IGNORE, IGNORE])], 2, seed=0, pad_id=0)
    with pytest.raises(UserError, match="loss mask is all zero"):
        next(loader)


def test_packing_keeps_every_target_inside_its_sample() -> None:
    rows = [([i] * n, [i + 100] * (n - 1) + [IGNORE]) for i, n in enumerate([5, 3, 7, 2, 6, 4])]
    packed = pack(rows, 10)
    assert sorted(len(x) for x, _, _ in packed) == [7, 10, 10]  # first fit decreasing: 7+3, 6+4, 5+2
    for x, y, samples in packed:
        for pos, (xi, yi) in enumerate(zip(x, y, strict=True)):
            assert yi in (IGNORE, xi + 100), (pos, x, y)  # every target belongs to the sample of its input
        assert [x[i] for i in range(1, len(x)) if samples[i] != samples[i - 1]] == [x[-1]]  # one boundary


def test_packed_rows_score_what_the_samples_score_alone(base: Path, tmp_path: Path) -> None:
    ckpt = load_checkpoint(base)
    chats = [
        {"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes " * i}]}
        for i in range(1, 7)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", chats)
    alone, _ = build_rows(ckpt.tokenizer, data, 60)
    packed, _ = build_rows(ckpt.tokenizer, data, 60, packing=True)
    assert len(packed) < len(alone)
    a = masked_loss(ckpt.model, ckpt.tokenizer, alone)
    b = masked_loss(ckpt.model, ckpt.tokenizer, packed)
    assert abs(a["val_loss"] - b["val_loss"]) < 1e-5 and abs(a["val_bpb"] - b["val_bpb"]) < 1e-5


def test_validation_shows_its_progress_on_stderr(base: Path, tmp_path: Path, capsys) -> None:
    """Fine-tuning's validation counts its batches on stderr as pretraining's does; the numbers stay the same."""
    ckpt = load_checkpoint(base)
    chats = [{"messages": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "Yes."}]}
             for i in range(5)]  # fmt: skip
    rows, _ = build_rows(ckpt.tokenizer, write_jsonl(tmp_path / "d.jsonl", chats), 60)
    quiet = masked_loss(ckpt.model, ckpt.tokenizer, rows, batch_size=2)
    assert capsys.readouterr().err == ""
    assert masked_loss(ckpt.model, ckpt.tokenizer, rows, batch_size=2, progress=True) == quiet
    assert "validation:   0%|          | 0/3 " in capsys.readouterr().err


def test_loader_batches_are_a_function_of_seed_and_step() -> None:
    rows = [([i, i + 1], [i + 1, i + 2]) for i in range(10)]
    a = RowLoader(rows, 3, seed=5, pad_id=0)
    batches = [next(a) for _ in range(8)]  # more than two epochs
    seen = torch.cat([x[:, 0] for x, _ in batches[:4]])[:10]
    assert sorted(seen.tolist()) == list(range(10))  # one epoch visits every row once
    b = RowLoader(rows, 3, seed=5, pad_id=0)
    b.load_state_dict({"seed": 5, "step": 5, "rows": 10})
    for want in batches[5:]:
        got = next(b)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(UserError, match="did the data file change"):
        b.load_state_dict({"seed": 5, "step": 1, "rows": 11})


def ft_config(base: Path, data: Path, out: Path, **finetune: object) -> RunConfig:
    train = {"out_dir": str(out), "steps": 60, "batch_size": 4, "seq_len": 48, "lr": 3e-3, "schedule": "constant"}
    train |= {"warmup_steps": 0, "eval_every": 0, "save_every": 0, "log_every": 5, "seed": 3, "weight_decay": 0.0}
    train |= finetune.pop("train", {})  # type: ignore[operator]
    return RunConfig(
        train=TrainConfig(**train),  # type: ignore[arg-type]
        finetune=FinetuneConfig(base=str(base), data=str(data), **finetune),  # type: ignore[arg-type]
    )


def peft_forward(base: Path, adapter: Path, hf_dir: Path):
    """The HF export of the base with our checkpoint's adapter loaded by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from nomoat.checkpoint import load_checkpoint
    from nomoat.convert import to_hf

    to_hf(load_checkpoint(base), hf_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter).eval()
    return lambda x: model(x).logits


def answer(model: torch.nn.Module, tok: Tokenizer, question: str) -> tuple[str, bool]:
    prompt = tok.encode(render_chat(tok, [{"role": "user", "content": question}]))
    ids = list(generate_tokens(model, prompt, 24, temperature=0, eos_id=tok.eos_id))
    return tok.decode(ids), len(ids) < 24  # fewer than asked for: it stopped at eos


@pytest.mark.slow
def test_tiny_model_learns_to_answer_and_stop(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records())
    result = finetune(ft_config(base, data, tmp_path / "run", method="full", val_data=str(data)), progress=False)
    assert result.train_loss < 0.05 and result.val_loss is not None and result.val_loss < 0.05
    assert result.val_bpb is not None and 0 < result.val_bpb < 0.1  # scored tokens only, over their UTF-8 bytes
    tuned = load_model(tmp_path / "run")
    for q, a in CHATS:
        text, stopped = answer(tuned.model, tuned.tokenizer, q)
        assert text == f"{a}<|im_end|>\n" and stopped
    before, stopped = answer(load_model(base).model, tuned.tokenizer, CHATS[0][0])
    assert not before.startswith("Blue.")
    reply = stream_reply(tuned.model, tuned.tokenizer, [{"role": "user", "content": CHATS[1][0]}], temperature=0)
    assert "".join(reply) == CHATS[1][1]  # the turn closer <|im_end|> is not shown
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{CHATS[2][0]}\n/reset\n{CHATS[3][0]}\n\n"))  # trained on one turn
    assert main(["chat", str(tmp_path / "run"), "--temperature", "0"]) == 0
    assert capsys.readouterr().out == f"> {CHATS[2][1]}\n> > {CHATS[3][1]}\n> "


@pytest.mark.slow
def test_lora_run_resumes_exactly_and_merges(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records())

    def lora_run(out: str, steps: int) -> RunConfig:
        train = {"steps": steps, "log_every": 1, "lr": 1e-2}
        return ft_config(base, data, tmp_path / out, method="lora", lora_rank=4, lora_dropout=0.1, train=train)

    finetune(lora_run("a", 8), progress=False)
    losses = [json.loads(r)["loss"] for r in (tmp_path / "a/metrics.jsonl").read_text().splitlines() if "loss" in r]
    finetune(lora_run("b", 4), progress=False)
    again = lora_run("b", 8)
    result = finetune(again, resume=True, progress=False)
    resumed = [json.loads(r)["loss"] for r in (tmp_path / "b/metrics.jsonl").read_text().splitlines() if "loss" in r]
    assert resumed == losses
    ckpt = result.checkpoint
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert json.loads((ckpt / "adapter_config.json").read_text())["r"] == 4
    peft_logits = peft_forward(base, ckpt, tmp_path / "hf")
    x = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_logits(x), load_model(ckpt).model(x), rtol=1e-4, atol=1e-4)
    report = merge(ckpt, tmp_path / "merged")
    assert abs(report["bpb_after"] - report["bpb_adapter"]) < 1e-4  # an fp32 merge changes nothing
    rows = build_rows(tok_of(base), data, 48)[0]
    assert report["bpb_before"] == pytest.approx(masked_loss(load_model(base).model, tok_of(base), rows)["val_bpb"])
    assert report["bpb_change"] < -0.1  # "before" is the base alone, so what the fine-tune taught shows
    merged = load_model(tmp_path / "merged")
    unmerged = load_model(ckpt)
    x = torch.randint(0, 320, (1, 12))
    torch.testing.assert_close(merged.model(x), unmerged.model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_qlora_trains_merges_and_cli(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records())
    run = tmp_path / "q"
    code = main(
        ["finetune", "--base", str(base), "--data", str(data), "--method", "qlora", "--train.out_dir", str(run),
         "--train.steps", "6", "--train.seq_len", "48", "--train.batch_size", "2", "--finetune.lora_rank", "4",
         "--json"]
    )  # fmt: skip
    assert code == 0
    ckpt = json.loads(capsys.readouterr().out.splitlines()[-1])["checkpoint"]
    assert main(["merge", ckpt, "--out", str(tmp_path / "m"), "--requantize", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert report["requantized"] and report["bpb_change"] is not None
    assert main(["info", ckpt]) == 0
    assert f"base       {base} (qlora fine-tuning)" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n{oops\n')
    args = ["finetune", "--base", str(base), "--data", str(data), "--train.out_dir", str(tmp_path / "r")]
    assert main(args) == 2
    assert "train.seq_len (256) exceeds the base model's context (64)" in capsys.readouterr().err
    code = main([*args, "--train.seq_len", "48"])
    err = capsys.readouterr().err.strip()
    assert (
        code == 2
        and err == f"nomoat: error: {data}:2: not valid JSON (Expecting property name enclosed in double quotes)"
    )
    assert main(["finetune", "--base", str(base), "--data", str(data), "--finetune.lora_rnk", "4"]) == 2
    assert "did you mean 'finetune.lora_rank'" in capsys.readouterr().err


def test_packed_fine_tuning_runs_through_the_loop(base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", chat_records())
    cfg = ft_config(base, data, tmp_path / "run", method="lora", packing=True, train={"steps": 3, "log_every": 1})
    finetune(cfg, progress=False)
    losses = [json.loads(r)["loss"] for r in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if "loss" in r]
    assert len(losses) == 3 and all(0 < v < 20 for v in losses)


def train_losses(run: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (run / "metrics.jsonl").read_text().splitlines() if "loss" in r]


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_checkpoints_hold_what_trains_and_resume_exactly(base: Path, tmp_path: Path, method: str) -> None:
    """state/ holds the adapter and its optimizer moments, not the frozen base (a 703 MB folder for a 19 MB
    adapter): resume rebuilds the base, checked by hash, and continues bit for bit."""
    from safetensors.torch import load_file

    from nomoat.checkpoint import _state_metadata, _state_tensors

    data = write_jsonl(tmp_path / "chats.jsonl", chat_records())

    def run(out: str, steps: int) -> RunConfig:
        train = {"steps": steps, "log_every": 1, "save_every": 2, "keep_last": 0, "lr": 1e-2}
        return ft_config(base, data, tmp_path / out, method=method, lora_rank=4, lora_dropout=0.1, train=train)

    finetune(run("a", 4), progress=False)
    finetune(run("b", 2), progress=False)
    finetune(run("b", 4), resume=True, progress=False)
    a, b = tmp_path / "a/checkpoints/step_00000004", tmp_path / "b/checkpoints/step_00000004"
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    assert (a / "adapter_model.safetensors").read_bytes() == (b / "adapter_model.safetensors").read_bytes()
    assert all(".lora_" in name for name in _state_tensors(a))  # no base weight, no NF4 code
    stored = {k: v for k, v in _state_metadata(a).state_dict_metadata.items() if hasattr(v, "size")}
    adapter = sum(t.numel() * t.element_size() for t in load_file(a / "adapter_model.safetensors").values())
    moments = sum(v.size.numel() * v.properties.dtype.itemsize for k, v in stored.items() if "exp_avg" in k)
    assert moments == 2 * adapter  # AdamW's two moments of each adapter tensor, and nothing else that is large
    assert sum(v.size.numel() * v.properties.dtype.itemsize for v in stored.values()) < 3.1 * adapter
    assert folder_bytes(a) < (base / "model.safetensors").stat().st_size  # the whole folder: less than the base


def test_resume_over_a_changed_base_is_refused(base: Path, tmp_path: Path) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, tmp_path / "base")
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records())
    cfg = ft_config(tmp_path / "base", data, tmp_path / "run", train={"steps": 2, "save_every": 2})
    finetune(cfg, progress=False)
    weights = load_file(tmp_path / "base/model.safetensors")
    weights["norm.weight"] = weights["norm.weight"] + 1
    save_file(weights, tmp_path / "base/model.safetensors")
    with pytest.raises(UserError, match="cannot resume .* frozen weights had sha256 .*the base model changed"):
        finetune(ft_config(tmp_path / "base", data, tmp_path / "run", train={"steps": 4}), resume=True)


def test_finetune_checks_its_run_folder_before_loading_the_base(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "chats.jsonl", chat_records())
    (tmp_path / "run/checkpoints/step_00000002").mkdir(parents=True)
    monkeypatch.setattr("nomoat.finetune.load_model", lambda *a, **k: pytest.fail("loaded the base first"))
    with pytest.raises(UserError, match="run already holds checkpoints: pass --resume"):
        finetune(ft_config(base, data, tmp_path / "run"), progress=False)
    with pytest.raises(UserError, match="new: no checkpoint to resume from"):
        finetune(ft_config(base, data, tmp_path / "new"), resume=True, progress=False)


def test_merge_of_a_model_without_an_adapter_says_so(
    base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["merge", str(base), "--out", str(tmp_path / "m")]) == 2
    want = f"{base}: not a LoRA adapter (no adapter_config.json): a whole model, with nothing to merge"
    assert capsys.readouterr().err.strip() == f"nomoat: error: {want}"
