"""DPO and IPO (nomoat/dpo.py) against TRL's DPOTrainer on a tiny Hugging Face LLaMA: the same token ids for
string and conversational records, and the same loss, reward metrics and LoRA gradients with the disabled-adapter
reference and with precomputed reference log-probs. Then through the loop: metrics rows with TRL's names, exact
resume, merge, validation on held-out pairs, and bad input named by file and line with exit status 2."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nomoat.chat import DEFAULT_CHAT_TEMPLATE
from nomoat.cli import main
from nomoat.config import FinetuneConfig, RunConfig, TrainConfig
from nomoat.dpo import DPOLoss, collate_pairs, precompute_reference, read_pairs, with_reference
from nomoat.finetune import finetune, merge
from nomoat.load import load_model
from nomoat.lora import adapters_disabled, add_lora, lora_layers
from nomoat.tokenizer import train_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUESTIONS = [
    ("What colour is the sky?", "Blue.", "Green, like grass."),
    ("What do cows drink?", "Water, mostly.", "Milk."),
    ("Name a prime number.", "Seven.", "Nine, I think."),
    ("Say hello.", "Hello there!", "No."),
]


def string_records() -> list[dict[str, Any]]:
    return [{"prompt": f"Q: {q}\nA:", "chosen": f" {c}", "rejected": f" {r}"} for q, c, r in QUESTIONS]


def chat_records() -> list[dict[str, Any]]:
    return [
        {
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for q, c, r in QUESTIONS
    ]


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random transformers LlamaForCausalLM saved as a Hugging Face folder, with a byte-level BPE tokenizer
    and a ChatML chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("dpo_hf")
    text = [f"Q: {q}\nA: {c} {r} user assistant system" for q, c, r in QUESTIONS] * 8
    tok = train_tokenizer(text, 320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok.hf,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    hf_tok.save_pretrained(folder)
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def where(records: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"pairs.jsonl:{i + 1}", r) for i, r in enumerate(records)]


def trl_side(
    hf_base: Path, tmp: Path, records: list, kind: str, beta: float, precompute: bool, sft: float = 0.0
) -> Any:
    """TRL's DPOTrainer with a fresh LoRA adapter (so its reference is the adapter switched off), set up but not
    trained: its dataset as TRL tokenized it, and its compute_loss."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp / "trl"), beta=beta, precompute_ref_log_probs=precompute,
        loss_type=[kind, "sft"] if sft else [kind], loss_weights=[1.0, sft] if sft else None,
        per_device_train_batch_size=len(records), max_length=None, report_to="none", use_cpu=True,
        gradient_checkpointing=False, save_strategy="no", dataloader_num_workers=0, seed=0, bf16=False,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(hf_base, dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_list(records),
        processing_class=AutoTokenizer.from_pretrained(hf_base),
        peft_config=lora,
    )


def ours_with_lora(hf_base: Path) -> Any:
    """The same base through nomoat's loader, a LoRA adapter with random A and B (so that the policy departs from
    its reference)."""
    ckpt = load_model(hf_base)
    model = ckpt.model.float().train()
    torch.manual_seed(1)
    add_lora(model, 4, 8.0, 0.0, tuple(TARGETS))
    g = torch.Generator().manual_seed(2)
    for layer in lora_layers(model).values():
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.1
    return ckpt, model


def copy_lora_into_peft(model: torch.nn.Module, peft_model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Our adapter's weights into PEFT's; returns PEFT's parameter for each of ours, by our name."""
    params = {}
    for name, layer in lora_layers(model).items():
        for kind in ("lora_A", "lora_B"):
            theirs = peft_model.get_parameter(f"base_model.model.model.{name}.{kind}.default.weight")
            theirs.data.copy_(getattr(layer, kind).data)
            params[f"{name}.{kind}"] = theirs
    return params


@pytest.mark.parametrize(
    "kind, records, precompute, sft",
    [
        ("sigmoid", string_records, False, 0.0),
        ("sigmoid", chat_records, False, 0.0),
        ("ipo", string_records, False, 0.0),
        ("ipo", chat_records, False, 0.0),
        ("sigmoid", string_records, True, 0.0),
        ("ipo", chat_records, True, 0.0),
        ("sigmoid", chat_records, False, 0.7),
        ("ipo", string_records, True, 0.3),
    ],
    ids=["sigmoid-str", "sigmoid-chat", "ipo-str", "ipo-chat", "sigmoid-str-precomputed", "ipo-chat-precomputed",
         "sigmoid+sft-chat", "ipo+sft-str-precomputed"],
)  # fmt: skip
def test_loss_rewards_and_gradients_match_trl(
    hf_base: Path, tmp_path: Path, kind: str, records, precompute: bool, sft: float
) -> None:
    """Loss, metrics and LoRA gradients equal TRL's, also with its "sft" term added (sft_weight, RPO)."""
    records, beta = records(), 0.5
    trainer = trl_side(hf_base, tmp_path, records, kind, beta, precompute, sft)
    ckpt, model = ours_with_lora(hf_base)
    pairs = read_pairs(ckpt.tokenizer, where(records), 63)[0]
    data = trainer.train_dataset
    assert [p[0] for p in pairs] == data["prompt_ids"]  # tokenized as TRL tokenizes
    assert [p[1] for p in pairs] == data["chosen_ids"] and [p[2] for p in pairs] == data["rejected_ids"]

    objective = DPOLoss(model, beta, kind, precomputed=precompute, sft_weight=sft)
    if precompute:
        ref = precompute_reference(model, pairs, ckpt.tokenizer.eos_id, 2, "cpu")
        torch.testing.assert_close(ref[:, 0], torch.tensor(data["ref_chosen_logps"]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref[:, 1], torch.tensor(data["ref_rejected_logps"]), rtol=1e-5, atol=1e-5)
        pairs = with_reference(pairs, ref)
    loss, metrics = objective(model, collate_pairs(pairs, ckpt.tokenizer.eos_id))
    loss.backward()

    peft_params = copy_lora_into_peft(model, trainer.model)
    trainer.model.train()
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    their_loss = trainer.compute_loss(trainer.model, batch)
    their_loss.backward()
    theirs = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    torch.testing.assert_close(loss, their_loss, rtol=1e-5, atol=1e-5)
    names = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"]
    for name in [*names, "logps/rejected"]:
        assert metrics[name].item() == pytest.approx(theirs[name], rel=1e-5, abs=1e-5), name
    assert abs(theirs["rewards/margins"]) > 1e-3  # the adapter really moved the policy from its reference
    for name, layer in lora_layers(model).items():
        for k in ("lora_A", "lora_B"):
            ours_grad, their_grad = getattr(layer, k).grad, peft_params[f"{name}.{k}"].grad
            torch.testing.assert_close(ours_grad, their_grad, rtol=1e-5, atol=1e-5, msg=f"{name}.{k}")


def test_implicit_prompt_conversations_split_as_trl_splits_them(hf_base: Path) -> None:
    from trl.data_utils import extract_prompt as trl_extract_prompt

    from nomoat.dpo import extract_prompt
    from nomoat.tokenizer import Tokenizer

    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chat_records()]
    for record in implicit:
        assert extract_prompt(record) == trl_extract_prompt(record)
    tok = Tokenizer.load(hf_base)
    assert read_pairs(tok, where(implicit), 63)[0] == read_pairs(tok, where(chat_records()), 63)[0]


def test_label_smoothing_is_conservative_dpo(hf_base: Path) -> None:
    """TRL 1.16 dropped label smoothing from its sigmoid loss (it kept it for 'robust' and 'exo_pair'): checked
    against cDPO's formula, the one TRL used before, on the same log-probs."""
    ckpt, model = ours_with_lora(hf_base)
    pairs = read_pairs(ckpt.tokenizer, where(string_records()), 63)[0]
    batch = collate_pairs(pairs, ckpt.tokenizer.eos_id)
    with torch.no_grad():
        plain, _ = DPOLoss(model, 0.5)(model, batch)
        smooth, _ = DPOLoss(model, 0.5, label_smoothing=0.2)(model, batch)
    policy = _logps(model, batch)
    with adapters_disabled(model), torch.no_grad():
        ref = _logps(model, batch)
    (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
    logits = 0.5 * ((pc - rc) - (pr - rr))
    sig = torch.nn.functional.logsigmoid
    torch.testing.assert_close(plain, -sig(logits).mean())
    torch.testing.assert_close(smooth, (-sig(logits) * 0.8 - sig(-logits) * 0.2).mean())


def _logps(model: torch.nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Summed completion log-probs the slow way: full logits, log_softmax, gather."""
    x, y = batch[:2]
    with torch.no_grad():
        logp = torch.log_softmax(model(x).float(), -1)
    scored = y != -100
    return (logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * scored).sum(1)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dpo_config(base: Path, data: Path, out: Path, **finetune: Any) -> RunConfig:
    train = {"steps": 6, "batch_size": 2, "seq_len": 48, "lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
             "dtype": "float32", "log_every": 1, "save_every": 3, "eval_every": 3, "keep_last": 0, "seed": 3,
             "out_dir": str(out)}  # fmt: skip
    train |= finetune.pop("train", {})
    fc = {"base": str(base), "data": str(data), "objective": "dpo", "beta": 0.5, "lora_rank": 4, **finetune}
    return RunConfig(train=TrainConfig(**train), finetune=FinetuneConfig(**fc))


def metric_rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precompute", [False, True], ids=["adapter-off", "precomputed"])
def test_dpo_through_the_loop_resumes_exactly_and_merges(
    hf_base: Path, tmp_path: Path, precompute: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", chat_records())
    cfg = dpo_config(hf_base, data, tmp_path / "a", precompute_ref=precompute, val_data=str(data))
    result = finetune(cfg, progress=False)
    rows = metric_rows(tmp_path / "a")
    train_rows = [r for r in rows if "loss" in r]
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert all(name in r for r in train_rows), name
    assert train_rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # a fresh adapter is its own reference: log 2
    assert train_rows[-1]["rewards/margins"] > train_rows[0]["rewards/margins"]
    # throughput counts the rows the model ran: chosen and rejected (2 x batch_size), as long as the longest pair
    pairs = read_pairs(load_model(hf_base).tokenizer, where(chat_records()), 48)[0]
    longest = max(len(p) + max(len(c), len(r)) - 1 for p, c, r in pairs)
    assert all(r["tokens"] % (2 * 2) == 0 and r["tokens"] <= 2 * 2 * longest for r in train_rows)
    assert any(r["tokens"] == 2 * 2 * longest for r in train_rows) and longest < 48  # not batch_size x seq_len
    val = [r for r in rows if "val_loss" in r]
    assert len(val) == 2 and "val_rewards/accuracies" in val[-1] and val[-1]["val_loss"] < 0.6931
    model = ours_with_lora(hf_base)[1]
    objective = DPOLoss(model)
    quiet = objective.evaluate(model, pairs, 0, 2, "cpu")
    assert objective.evaluate(model, pairs, 0, 2, "cpu", progress=True) == quiet  # a bar of batches on stderr
    assert f"validation:   0%|          | 0/{-(-len(pairs) // 2)} " in capsys.readouterr().err
    assert result.val_loss == val[-1]["val_loss"] and result.val_bpb is None

    finetune(dpo_config(hf_base, data, tmp_path / "b", precompute_ref=precompute, val_data=str(data),
                        train={"steps": 3}), progress=False)  # fmt: skip
    resumed = finetune(cfg.__class__(train=TrainConfig(**{**vars(cfg.train), "out_dir": str(tmp_path / "b")}),
                                     finetune=cfg.finetune), resume=True, progress=False)  # fmt: skip
    exact = ("step", "loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/chosen", "logps/rejected")
    again = [r for r in metric_rows(tmp_path / "b") if "loss" in r]
    assert [[r[k] for k in exact] for r in again] == [[r[k] for k in exact] for r in train_rows]
    a = (result.checkpoint / "adapter_model.safetensors").read_bytes()
    assert a == (resumed.checkpoint / "adapter_model.safetensors").read_bytes()
    if precompute:
        assert (resumed.checkpoint / "dpo_reference_logps.safetensors").is_file()

    report = merge(result.checkpoint, tmp_path / "merged")
    assert report["bpb_before"] is not None and abs(report["bpb_change"]) > 1e-4  # DPO moved the chosen replies
    merged, tuned = load_model(tmp_path / "merged"), load_model(result.checkpoint)
    x = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x), tuned.model(x), rtol=1e-4, atol=1e-4)


def test_full_weights_dpo_runs_with_a_frozen_copy(hf_base: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", string_records())
    result = finetune(dpo_config(hf_base, data, tmp_path / "full", method="full", train={"steps": 3}), progress=False)
    rows = [r for r in metric_rows(tmp_path / "full") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and rows[-1]["rewards/margins"] > 0
    assert (result.checkpoint / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "record, error",
    [
        ({"prompt": "a", "chosen": "b"}, "pairs.jsonl:2: a preference record needs 'prompt', 'chosen' and 'rejected' "
         "(no 'rejected'; has: chosen, prompt)"),
        ({"prompt": "a", "rejected": "b"}, "pairs.jsonl:2: a preference record needs 'prompt', 'chosen' and "
         "'rejected' (no 'chosen'; has: prompt, rejected)"),
        ({"chosen": "a b", "rejected": "a c"}, "pairs.jsonl:2: a preference record needs 'prompt' (only "
         "conversations may leave it implicit)"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, "pairs.jsonl:2: 'chosen' and 'rejected' are identical: "
         "the pair prefers nothing"),
        ({"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"}, "pairs.jsonl:2: "
         "'prompt', 'chosen' and 'rejected' must all be strings or all be lists of messages"),
        ({"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "bot", "content": "b"}],
          "rejected": [{"role": "assistant", "content": "c"}]}, "pairs.jsonl:2: message 0: unknown role 'bot'"),
        ({"prompt": "", "chosen": "b", "rejected": "c"}, "pairs.jsonl:2: the prompt is empty"),
    ],
)  # fmt: skip
def test_bad_records_exit_2_naming_file_and_line(
    hf_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], record: dict, error: str
) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", [string_records()[0], record])
    args = ["finetune", "--base", str(hf_base), "--data", str(data), "--objective", "dpo",
            "--train.out_dir", str(tmp_path / "r"), "--train.seq_len", "48"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nomoat: error: {tmp_path}/{error}") and "\n" not in err
    assert not (tmp_path / "r").exists()


def test_conversations_need_a_chat_template(hf_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    base = tmp_path / "no_template"
    shutil.copytree(hf_base, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_jsonl(tmp_path / "pairs.jsonl", chat_records())
    args = ["finetune", "--base", str(base), "--data", str(data), "--method", "dpo", "--train.seq_len", "48",
            "--train.out_dir", str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"nomoat: error: {data}:1: conversational records need the model's chat template, and its tokenizer has none"
    )


@pytest.mark.parametrize(
    "flags, error",
    [
        (["--finetune.beta", "0"], "finetune.beta must be positive, got 0.0"),
        (["--finetune.label_smoothing", "0.5"], "finetune.label_smoothing must be in [0, 0.5), got 0.5"),
        (["--finetune.dpo_loss", "ipo", "--finetune.label_smoothing", "0.1"],
         "finetune.label_smoothing applies to dpo_loss 'sigmoid' only, not 'ipo'"),
        (["--finetune.dpo_loss", "hinge"], "finetune.dpo_loss: 'hinge' is not one of 'sigmoid', 'ipo'"),
        (["--finetune.packing", "true"], "finetune.packing does not apply to objective 'dpo'"),
        (["--finetune.sft_weight", "-1"], "finetune.sft_weight must be zero or positive, got -1.0"),
        (["--objective", "sft", "--finetune.sft_weight", "1"], "finetune.sft_weight applies to objective 'dpo' only"),
        (["--objective", "sft", "--method", "dpo"], "--method dpo means --objective dpo (with LoRA)"),
    ],
)  # fmt: skip
def test_bad_settings_exit_2(hf_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, error) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", string_records())
    objective = [] if "--objective" in flags else ["--objective", "dpo"]
    args = ["finetune", "--base", str(hf_base), "--data", str(data), "--train.out_dir", str(tmp_path / "r"),
            *objective, *flags]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nomoat: error: {error}") and "\n" not in err


def test_method_dpo_is_lora_dpo_from_the_cli(hf_base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "pairs.jsonl", string_records())
    args = ["finetune", "--base", str(hf_base), "--data", str(data), "--method", "dpo", "--train.out_dir",
            str(tmp_path / "r"), "--train.steps", "2", "--train.seq_len", "48", "--train.batch_size", "2",
            "--finetune.precompute_ref", "true", "--json"]  # fmt: skip
    assert main(args) == 0
    ckpt = Path(json.loads(capsys.readouterr().out.splitlines()[-1])["checkpoint"])
    assert json.loads((ckpt / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert 'objective = "dpo"' in (ckpt / "config.toml").read_text()
    assert "rewards/accuracies" in metric_rows(tmp_path / "r")[-1]
