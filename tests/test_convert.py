"""Hugging Face conversion: tiny random transformers models in, same logits and greedy tokens, exact round trip."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE
from safetensors.torch import load_file

from nomoat.checkpoint import load_checkpoint
from nomoat.convert import config_from_hf, from_hf, load_hf, to_hf
from nomoat.errors import UserError
from nomoat.generate import generate_tokens
from nomoat.lineage import lineage
from nomoat.tokenizer import train_tokenizer

transformers = pytest.importorskip("transformers")

V = 320
LLAMA = {
    "vocab_size": V, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
}  # fmt: skip
VARIANTS = {
    "llama-gqa": ("LlamaConfig", "LlamaForCausalLM", {**LLAMA, "num_key_value_heads": 2, "rope_theta": 5000.0}),
    "llama3-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            **LLAMA,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),  # fmt: skip
    "mistral": ("MistralConfig", "MistralForCausalLM", {**LLAMA, "num_key_value_heads": 1, "sliding_window": None}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {**LLAMA, "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "qwen3": (  # QK-norm, and an explicit head_dim that is not hidden_size / heads
        "Qwen3Config",
        "Qwen3ForCausalLM",
        {
            **LLAMA,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_key_value_heads": 2,
            "head_dim": 32,
            "tie_word_embeddings": False,
            "rope_theta": 1000000.0,
        },
    ),
    "pythia": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "vocab_size": V,
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 64,
            "rotary_pct": 0.25,
            "hidden_act": "gelu",
        },
    ),  # fmt: skip
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {
            "vocab_size": V,
            "n_positions": 64,
            "n_embd": 32,
            "n_layer": 2,
            "n_head": 4,
            "bos_token_id": 0,
            "eos_token_id": 0,
        },
    ),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer([SHAKESPEARE.read_text()[:50_000]], vocab_size=V).save(folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": None}))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return folder


def make_hf(variant: str, folder: Path, tokenizer_dir: Path, **save_kwargs) -> torch.nn.Module:
    config_cls, model_cls, kwargs = VARIANTS[variant]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    with torch.no_grad():  # zero biases and unit norms would hide a misplaced tensor
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.normal_(0.5, 0.2)
    model.save_pretrained(folder, **save_kwargs)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_pair(request, tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, make_hf(request.param, folder, tokenizer_dir), folder


def test_logits_and_greedy_tokens_match(hf_pair):
    _, hf, folder = hf_pair
    ours = load_hf(folder).model.eval()
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)
    prompt = idx[0, :8]
    theirs = hf.generate(prompt[None], max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None)
    mine = list(generate_tokens(ours, prompt.tolist(), max_new_tokens=32, temperature=0))
    assert mine == theirs[0, 8:].tolist()


def test_round_trip_reproduces_every_tensor(hf_pair, tmp_path):
    _, hf, folder = hf_pair
    from_hf(folder, tmp_path / "nomoat")
    ckpt = load_checkpoint(tmp_path / "nomoat")
    assert lineage(tmp_path / "nomoat")["base"] == hf.config.architectures[0]  # `nomoat info` names the origin
    to_hf(ckpt, tmp_path / "back")
    original, back = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "back/model.safetensors"))
    assert set(back) == set(original)
    for name, t in back.items():
        assert torch.equal(t, original[name]), name
    assert (tmp_path / "back/chat_template.jinja").is_file()
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(idx).logits, hf(idx).logits, rtol=1e-5, atol=1e-5)


def test_published_config_layout_loads_the_same(hf_pair, tmp_path):
    """Checkpoints on the hub carry rope_theta / rope_scaling / rotary_pct; transformers 5 writes rope_parameters."""
    variant, _, folder = hf_pair
    hf = json.loads((folder / "config.json").read_text())
    rope = hf.pop("rope_parameters", None)
    if rope is None:
        pytest.skip("no RoPE")
    old = dict(hf, rope_theta=rope["rope_theta"])
    if "partial_rotary_factor" in rope:
        old |= {"rotary_pct": rope["partial_rotary_factor"], "rotary_emb_base": rope["rope_theta"]}
        old.pop("rope_theta")
    if rope.get("rope_type") == "llama3":
        old["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    hf["rope_parameters"] = rope
    assert config_from_hf(old) == config_from_hf(hf)


def test_sharded_checkpoint_and_cli(tmp_path, tokenizer_dir):
    make_hf("llama-gqa", tmp_path / "hf", tokenizer_dir, max_shard_size="20KB")
    assert (tmp_path / "hf/model.safetensors.index.json").is_file()
    cli = [sys.executable, "-m", "nomoat.cli", "convert"]
    subprocess.run([*cli, "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours")], check=True)
    subprocess.run([*cli, "to-hf", str(tmp_path / "ours"), str(tmp_path / "out"), "--dtype", "bfloat16"], check=True)
    state = load_file(str(tmp_path / "out/model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "bfloat16"  # the original said float32
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.bfloat16
    out = subprocess.run(
        [sys.executable, "-m", "nomoat.cli", "generate", str(tmp_path / "hf"), "--prompt", "ROMEO", "--json",
         "--max-new-tokens", "4", "--temperature", "0"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout.splitlines()[-1])["tokens"] > 0


def test_tokenizer_encodes_like_autotokenizer(tokenizer_dir):
    from nomoat.tokenizer import Tokenizer

    sample = "def f(x):\n    return x**2  # квадрат 🙂\n\n\tTabs,  spaces   and ünïcödé — “quotes” <|endoftext|>"
    theirs = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    assert Tokenizer.load(tokenizer_dir / "tokenizer.json").encode(sample) == theirs.encode(sample)


def one_line_error(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "nomoat.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_bad_checkpoints_are_named_and_nothing_is_written(tmp_path, tokenizer_dir):
    folder = tmp_path / "hf"
    make_hf("llama-gqa", folder, tokenizer_dir)
    out = tmp_path / "out"
    convert = ["convert", "from-hf", str(folder), str(out)]

    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, architectures=["FalconForCausalLM"])))
    assert "FalconForCausalLM is not supported (supported: LlamaForCausalLM" in one_line_error(convert)
    (folder / "config.json").write_text(json.dumps(cfg))

    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    assert "truncated" in one_line_error(convert)
    (folder / "model.safetensors").unlink()
    assert "no model.safetensors" in one_line_error(convert)

    (folder / "model.safetensors").write_bytes(weights)
    (folder / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=64)))
    assert "tensor layers.0.mlp.gate_proj.weight has shape (48, 32), config wants (64, 32)" in one_line_error(convert)
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    assert "missing tensor layers.2." in one_line_error(convert)
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    assert "unexpected tensor layers.1." in one_line_error(convert)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_missing_shard_is_named(tmp_path, tokenizer_dir):
    make_hf("llama-gqa", tmp_path / "hf", tokenizer_dir, max_shard_size="20KB")
    index = json.loads((tmp_path / "hf/model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "hf" / victim).unlink()
    assert f"{victim}: weight file missing" in one_line_error(
        ["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "o")]
    )
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="no such file"):
        load_hf(tmp_path / "nowhere")


def test_qwen3_at_fp32_parity_and_qk_norm_exports_as_qwen3(tmp_path, tokenizer_dir):
    """Qwen3's QK-norm and explicit head_dim import at fp32 parity; a qk_norm model trained here exports as
    Qwen3ForCausalLM that transformers computes alike; what no Hugging Face class expresses is refused."""
    from nomoat.checkpoint import Checkpoint
    from nomoat.config import ModelConfig, RunConfig, TrainConfig
    from nomoat.convert.hf import architecture_of
    from nomoat.model import Transformer
    from nomoat.tokenizer import Tokenizer

    hf = make_hf("qwen3", tmp_path / "hf", tokenizer_dir)
    ours = load_hf(tmp_path / "hf").model.eval()
    assert ours.cfg.qk_norm and ours.cfg.dim_head == 32 != ours.cfg.d_model // ours.cfg.n_head
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=1e-5, atol=1e-5)

    cfg = ModelConfig(
        vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64, head_dim=16, max_seq_len=64,
        norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qk_norm=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.5, 0.2) if p.dim() == 1 else p.normal_(0.0, 0.2)
    tok = Tokenizer.load(tokenizer_dir / "tokenizer.json")
    (tmp_path / "ckpt").mkdir()  # a model trained here: no hf_config.json, so the switches pick the class
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=32))
    to_hf(Checkpoint(tmp_path / "ckpt", run, model, tok, None), tmp_path / "back")
    assert json.loads((tmp_path / "back/config.json").read_text())["model_type"] == "qwen3"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, model(idx), rtol=1e-5, atol=1e-5)

    for bad in ({"norm": "layernorm"}, {"mlp": "gelu"}, {"pos_emb": "learned"}, {"bias": True}, {"qkv_bias": True}):
        with pytest.raises(UserError, match="model.qk_norm matches .* only with") as e:
            architecture_of(dataclasses.replace(cfg, **bad))
        assert "\n" not in str(e.value)
    config = json.loads((tmp_path / "hf/config.json").read_text())
    for bad in ({"use_sliding_window": True, "sliding_window": 16}, {"attention_bias": True}):
        with pytest.raises(UserError, match="Qwen3ForCausalLM with"):
            config_from_hf(config | bad)
