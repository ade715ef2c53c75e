"""LoRA surgery: a fresh adapter changes nothing, only adapter parameters learn, merging and unwrapping are exact,
and adapters cross over to PEFT on the Hugging Face model (and back) with the same logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nomoat.checkpoint import Checkpoint
from nomoat.config import ModelConfig, RunConfig, TrainConfig
from nomoat.errors import UserError
from nomoat.lora import LoRALinear, add_lora, load_adapter, lora_layers, merge_lora, save_adapter, unwrap_lora
from nomoat.model import Transformer
from nomoat.quant import NF4Linear, quantize_model
from nomoat.tokenizer import train_tokenizer

CFG = ModelConfig(
    vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=32,
    norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False, init="normal",
)  # fmt: skip


def tiny(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


def randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model).values():
        layer.lora_B.data = torch.randn(layer.lora_B.shape, generator=g) * 0.05


X = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))


def test_fresh_adapter_leaves_output_unchanged() -> None:
    model = tiny()
    want = model(X)
    names = add_lora(model, rank=4, alpha=8)
    assert len(names) == 14 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(model(X), want, rtol=0, atol=0)


def test_only_adapter_parameters_get_gradients() -> None:
    model = tiny()
    add_lora(model, rank=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj"))
    model.train()
    model(X).logsumexp(-1).sum().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_merge_and_unwrap_are_exact() -> None:
    model = tiny()
    want_base = model(X)
    add_lora(model, rank=4, alpha=16)
    randomize_b(model)
    with torch.no_grad():
        unmerged = model(X)
    assert (unmerged - want_base).abs().max() > 1e-3
    merged_model = tiny()
    add_lora(merged_model, rank=4, alpha=16)
    merged_model.load_state_dict(model.state_dict())
    merge_lora(merged_model)
    assert not lora_layers(merged_model) and isinstance(merged_model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(merged_model(X), unmerged, rtol=1e-4, atol=1e-5)
    unwrap_lora(model)
    torch.testing.assert_close(model(X), want_base, rtol=0, atol=0)


def test_lora_over_nf4_merges_into_dequantized_weights() -> None:
    model = tiny()
    quantize_model(model)
    add_lora(model, rank=4, alpha=8)
    assert isinstance(model.layers[0].mlp.up_proj.base, NF4Linear)
    randomize_b(model)
    with torch.no_grad():
        want = model(X)
    merge_lora(model)
    torch.testing.assert_close(model(X), want, rtol=1e-4, atol=1e-5)


def test_bad_targets_are_named() -> None:
    with pytest.raises(UserError, match="'qproj' is not a linear layer"):
        add_lora(tiny(), 4, 8, targets=("qproj",))


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transformer]:
    from nomoat.convert import to_hf

    root = tmp_path_factory.mktemp("lora_hf")
    tok = train_tokenizer(["a tiny corpus for a tiny tokenizer"] * 4, 300)
    model = tiny(5)
    ckpt = Checkpoint(root, RunConfig(model=CFG, train=TrainConfig(seq_len=32)), model, tok, None)
    return to_hf(ckpt, root / "hf"), model


def test_our_adapter_loads_in_peft_with_the_same_logits(hf_base, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, base = hf_base
    model = tiny(5)
    add_lora(model, rank=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "lm_head"))
    randomize_b(model)
    save_adapter(model, tmp_path / "adapter", base=str(hf_dir))
    with torch.no_grad():
        ours = model(X)
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = hf(X).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    assert (ours - base(X)).abs().max() > 1e-3  # the adapter really changes the output


def test_peft_adapter_loads_in_ours_with_the_same_logits(hf_base, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf_dir, _ = hf_base
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "up_proj", "gate_proj"], init_lora_weights=False)
    hf = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), config).eval()
    hf.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        theirs = hf(X).logits
    model = tiny(5)
    load_adapter(model, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(model(X), theirs, rtol=1e-4, atol=1e-4)
