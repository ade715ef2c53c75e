"""Tests for nomoat/load.py: one loader for every MODEL a user holds, and --adapter on every command that
takes a MODEL (generate, eval, to-hf here; chat and serve build on the same call)."""

import json
from pathlib import Path

import pytest
import torch

from nomoat.checkpoint import save_checkpoint
from nomoat.cli import main
from nomoat.config import ModelConfig, RunConfig, TrainConfig
from nomoat.convert import to_hf
from nomoat.errors import UserError
from nomoat.eval.loss import evaluate_text
from nomoat.generate import generate_text
from nomoat.load import load_model, model_kind
from nomoat.lora import add_lora, lora_layers, merge_lora, save_adapter
from nomoat.model import Transformer
from nomoat.tokenizer import train_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. " * 20


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Transformer]:
    """A random LLaMA-style checkpoint, a PEFT-format adapter for it with non-zero B, and the merged model."""
    root = tmp_path_factory.mktemp("load")
    tok = train_tokenizer([TEXT], 300)
    cfg = ModelConfig(
        vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, max_seq_len=64,
        norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg)
    base = save_checkpoint(root / "base", 0, model, RunConfig(model=cfg, train=TrainConfig(seq_len=32)), tok)
    add_lora(model, 4, 8.0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.2)
    save_adapter(model, root / "adapter", base=str(base))
    merge_lora(model)
    return base, root / "adapter", model.eval()


def test_kinds_are_told_from_the_files(base_and_adapter, tmp_path: Path) -> None:
    base, adapter, _ = base_and_adapter
    hf = to_hf(load_model(base), tmp_path / "hf")
    assert (model_kind(base), model_kind(adapter), model_kind(hf)) == ("nomoat", "adapter", "hf")
    assert model_kind(base.parent.parent) == "nomoat"  # the run folder


def test_adapter_given_separately_is_merged(base_and_adapter) -> None:
    base, adapter, merged = base_and_adapter
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    plain = load_model(base).model.eval()
    tuned = load_model(base, adapter=adapter).model
    with torch.no_grad():
        torch.testing.assert_close(tuned(x), merged(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(x), merged(x), atol=1e-3)  # the adapter really changes the model


def test_bare_adapter_without_base_is_one_clear_error(base_and_adapter) -> None:
    _, adapter, _ = base_and_adapter
    with pytest.raises(UserError, match="an adapter folder; give the base model, with --adapter"):
        load_model(adapter)
    with pytest.raises(UserError, match="not a LoRA adapter folder"):
        load_model(adapter.parent / "base", adapter=adapter.parent / "nowhere")


def test_cli_commands_take_adapter(base_and_adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter, merged = base_and_adapter
    tok = load_model(base).tokenizer
    args = ["generate", str(base), "--adapter", str(adapter), "--prompt", "The quick", "--temperature", "0"]
    assert main([*args, "--max-new-tokens", "12", "--json"]) == 0
    text = json.loads(capsys.readouterr().out.splitlines()[-1])["text"]
    assert text == "".join(generate_text(merged, tok, "The quick", max_new_tokens=12, temperature=0))

    (tmp_path / "doc.txt").write_text(TEXT)
    assert main(["eval", str(base), "--adapter", str(adapter), "--text", str(tmp_path / "doc.txt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    expected = evaluate_text(merged, tok, [str(tmp_path / "doc.txt")], 64, 0, 4)
    assert result["results"]["text"]["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-5)
    assert result["settings"]["adapter"] == str(adapter)

    assert main(["convert", "to-hf", str(base), str(tmp_path / "hf"), "--adapter", str(adapter)]) == 0
    x = torch.randint(0, 300, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "hf").model(x), merged(x), rtol=1e-5, atol=1e-5)


def test_generate_stops_before_a_stop_string(base_and_adapter, capsys: pytest.CaptureFixture[str]) -> None:
    base, _, _ = base_and_adapter
    args = ["generate", str(base), "--prompt", "The", "--temperature", "0", "--max-new-tokens", "30", "--json"]
    assert main(args) == 0
    full = json.loads(capsys.readouterr().out.splitlines()[-1])["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert main([*args, "--stop", "\x00never", "--stop", stop]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["text"] == full[: full.index(stop)]


def test_a_gguf_file_is_a_model_for_every_command(
    base_and_adapter, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, adapter, merged = base_and_adapter
    gguf_file = tmp_path / "model.gguf"
    assert main(["convert", "to-gguf", str(base), str(gguf_file)]) == 0
    assert model_kind(gguf_file) == "gguf"
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_model(gguf_file).model(x), load_model(base).model(x), rtol=1e-5, atol=1e-5)
        tuned = load_model(gguf_file, adapter=adapter).model  # an adapter applies over a GGUF base too
        torch.testing.assert_close(tuned(x), merged(x), rtol=1e-5, atol=1e-5)

    args = ["--prompt", "The quick", "--temperature", "0", "--max-new-tokens", "10", "--json"]
    texts = []
    for model in (base, gguf_file):
        assert main(["generate", str(model), *args]) == 0
        texts.append(json.loads(capsys.readouterr().out.splitlines()[-1])["text"])
    assert texts[0] == texts[1]
    assert main(["info", str(gguf_file), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert info["model"]["architecture"] == "GGUF llama" and info["base"] == str(gguf_file)
    assert main(["convert", "from-gguf", str(gguf_file), str(tmp_path / "back")]) == 0
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "back").model(x), load_model(base).model(x))


def test_a_missing_gguf_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", str(tmp_path / "nowhere.gguf"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"nomoat: error: {tmp_path / 'nowhere.gguf'}: no such GGUF file\n"


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_finetune_over_a_gguf_base(base_and_adapter, tmp_path: Path, method: str) -> None:
    """A GGUF file is a base like any other: the run records it, and loading the run applies its adapter to it."""
    from nomoat.config import FinetuneConfig
    from nomoat.finetune import finetune

    base, _, _ = base_and_adapter
    gguf_file = tmp_path / "base.gguf"
    assert main(["convert", "to-gguf", str(base), str(gguf_file)]) == 0
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": TEXT[i : i + 60]}) + "\n" for i in range(0, 400, 40)))
    train = TrainConfig(out_dir=str(tmp_path / "run"), steps=4, batch_size=2, seq_len=32, lr=1e-2, log_every=1)
    fc = FinetuneConfig(base=str(gguf_file), data=str(tmp_path / "d.jsonl"), method=method, lora_rank=4)
    result = finetune(RunConfig(train=train, finetune=fc), progress=False)
    tuned, plain = load_model(result.checkpoint), load_model(gguf_file)
    x = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.allclose(tuned.model(x), plain.model(x), atol=1e-4)  # the adapter, over the GGUF base


# ---- int8 / int4: streamed from float weights, and quantized checkpoints ----


def _no_quantizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make quantizing any float weight an error: what loads after this is made from stored codes alone."""
    import nomoat.quant

    def refuse(*_):
        raise AssertionError("a float weight was quantized")

    monkeypatch.setattr(nomoat.quant, "quantize_int8", refuse)
    monkeypatch.setattr(nomoat.quant, "quantize_int4", refuse)


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_streamed_quantization_equals_quantizing_the_whole_model(base_and_adapter, tmp_path: Path, bits: str) -> None:
    """load_model(quantize=) on a checkpoint or Hugging Face folder quantizes a layer at a time as the weights
    stream in: the same layers, and the same logits, as quantize_weights on the whole fp32 model."""
    from nomoat.quant import Int4Linear, quantize_weights

    base, _, _ = base_and_adapter
    hf = to_hf(load_model(base), tmp_path / "hf")
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = quantize_weights(load_model(base).model.float().eval(), bits)(x)
        for path in (base, hf):
            ckpt = load_model(path, quantize=bits)
            assert ckpt.cfg.model.quantize == bits and ckpt.weights is None
            assert torch.equal(ckpt.model(x), want)
    assert isinstance(ckpt.model.layers[0].mlp.gate_up_proj, Int4Linear) == (bits == "int4")


@pytest.mark.parametrize("bits", ["int8", "int4"])
def test_quantized_checkpoint_loads_as_the_model_it_was_written_from(
    base_and_adapter, tmp_path: Path, bits: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`nomoat convert quantize` writes int8 or int4 codes (int4 unpacked, as plain codes two to a byte); the
    folder loads as the same layers without quantizing a single float weight, so no fp32 projection exists."""
    from safetensors import safe_open

    from nomoat.quant import Int4Linear, Int8Embedding, Int8Linear

    base, _, _ = base_and_adapter
    out = tmp_path / bits
    assert main(["convert", "quantize", str(base), str(out), "--quantize", bits]) == 0
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert stored["layers.0.self_attn.qkv_proj." + ("codes" if bits == "int4" else "weight_int8")] == (
        "U8" if bits == "int4" else "I8"
    )
    assert not any(k.endswith((".packed", ".scales_and_zeros")) for k in stored)
    x = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = load_model(base, quantize=bits).model(x)
        _no_quantizing(monkeypatch)
        for ckpt in (load_model(out), load_model(out, quantize=bits), load_model(out, device="meta")):
            model = ckpt.model
            assert ckpt.cfg.model.quantize == bits and isinstance(model.embed_tokens, Int8Embedding)
            assert not any(type(m) is torch.nn.Linear for m in model.modules())
            assert all(p.dtype == torch.float32 and p.dim() == 1 for p in model.parameters())  # norms, biases
            assert isinstance(model.layers[1].self_attn.o_proj, Int4Linear if bits == "int4" else Int8Linear)
            assert torch.equal(model(x), want)
    assert main(["generate", str(out), "--prompt", "The quick", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    capsys.readouterr()


def test_quantized_checkpoint_bad_use_is_one_line(base_and_adapter, tmp_path: Path, capsys) -> None:
    base, adapter, _ = base_and_adapter
    out = tmp_path / "q8"
    assert main(["convert", "quantize", str(base), str(out), "--quantize", "int8"]) == 0
    capsys.readouterr()
    commands = {
        "holds int8 weights, not int4": ["generate", str(out), "--prompt", "x", "--quantize", "int4"],
        "apply the adapter to the float model": ["generate", str(out), "--prompt", "x", "--adapter", str(adapter)],
        "export the model it was made from": ["convert", "to-gguf", str(out), str(tmp_path / "m.gguf")],
        "--quantize": ["convert", "quantize", str(base), str(tmp_path / "x")],  # it is required
    }
    for message, args in commands.items():
        assert message in main_err(capsys, args)
    assert "export the model" in main_err(capsys, ["convert", "to-hf", str(out), str(tmp_path / "hf")])
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert "model.safetensors" in main_err(capsys, ["generate", str(out), "--prompt", "x"])
    assert not (tmp_path / "x").exists() and not (tmp_path / "m.gguf").exists()


def main_err(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    assert main(args) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("nomoat: error: ") and err.count("\n") == 1, err
    return err
