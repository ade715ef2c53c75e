"""GGUF in: tiny random models written by llama.cpp's own convert_hf_to_gguf.py and llama-quantize, read back
with the same logits, greedy tokens and token ids as the original and as transformers' GGUF loader."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from conftest import SHAKESPEARE
from test_convert import VARIANTS, V, make_hf

from nomoat.checkpoint import load_checkpoint
from nomoat.convert import load_hf
from nomoat.convert.gguf_read import PRE_TOKENIZERS, _llama3_rope, from_gguf, load_gguf
from nomoat.errors import UserError
from nomoat.generate import generate_tokens
from nomoat.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

CONVERT = Path(__file__).parents[1] / "scripts/llamacpp_convert.py"  # llama.cpp's converter, facts filled in
MIXED = "Hello wörld 😶‍🌫️ naïve — 12345 3.14\n\n\tdef f(x):\n    return x**2  # ok   \r\n  I'VE 'll <|endoftext|>!"
# What transformers reads from GGUF: no GPT-NeoX at all, Llama 3 without its rope_freqs (so other logits), and
# Qwen3 without its key_length (transformers 5.24 takes head_dim as 128, so the shapes do not fit).
TRANSFORMERS_TOKENIZER = ("llama-gqa", "llama3-tied", "mistral", "qwen2-tied", "qwen3", "gpt2")
TRANSFORMERS_MODEL = ("llama-gqa", "mistral", "qwen2-tied", "gpt2")


def to_gguf(source: Path, hf_dir: Path, out: Path, outtype: str = "f32", pre: str = "gpt-2") -> Path:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, str(CONVERT), str(source), pre, str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nomoat.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer([SHAKESPEARE.read_text()[:50_000]], vocab_size=V).save(folder / "tokenizer.json")
    # The class named, or transformers would pick GPTNeoXTokenizer for Pythia and add tokens the model lacks.
    config = {"eos_token": "<|endoftext|>", "bos_token": None, "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return folder


@pytest.fixture(scope="module", params=list(VARIANTS))
def gguf_pair(request, tmp_path_factory, tokenizer_dir, llamacpp_source):
    """(variant, the original transformers model, its folder, its F32 GGUF)."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = make_hf(request.param, folder / "hf", tokenizer_dir)
    return request.param, hf, folder, to_gguf(llamacpp_source, folder / "hf", folder / "model-f32.gguf")


def assert_same_model(ours: torch.nn.Module, theirs: torch.nn.Module, idx: torch.Tensor, tol: float) -> None:
    """Logits within tol, and the same 32 greedy tokens after the first 8 of idx[0]."""
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=tol, atol=tol)
    prompt = idx[0, :8]
    mine = list(generate_tokens(ours, prompt.tolist(), max_new_tokens=32, temperature=0))
    out = theirs.generate(prompt[None], max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None)
    assert mine == out[0, 8:].tolist()


def transformers_gguf(variant: str, hf: torch.nn.Module, path: Path) -> torch.nn.Module | None:
    """transformers' own reading of the GGUF file, where it has one."""
    if variant not in TRANSFORMERS_MODEL:
        return None
    # transformers reads GPT-2's context_length into n_ctx, which its GPT-2 no longer uses: say it again
    extra = {"n_positions": hf.config.n_positions} if variant == "gpt2" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, **extra).eval()


def test_f32_logits_and_greedy_tokens_match(gguf_pair):
    variant, hf, folder, path = gguf_pair
    ckpt = load_gguf(path)
    idx = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    assert_same_model(ckpt.model.eval(), hf, idx, 1e-5)
    if (theirs := transformers_gguf(variant, hf, path)) is not None:
        assert_same_model(ckpt.model, theirs, idx, 1e-5)
    assert ckpt.tokenizer.eos_token == "<|endoftext|>"
    assert ckpt.tokenizer.chat_template == (folder / "hf/chat_template.jinja").read_text()
    assert ckpt.cfg.train.seq_len <= ckpt.cfg.model.max_seq_len


@pytest.mark.slow  # a second conversion per architecture
def test_q8_0_is_close_and_matches_transformers_on_the_same_file(gguf_pair, llamacpp_source):
    variant, hf, folder, _ = gguf_pair
    path = to_gguf(llamacpp_source, folder / "hf", folder / "model-q8_0.gguf", "q8_0")
    ours = load_gguf(path).model.eval()
    idx = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, rtol=0.05, atol=0.05)
    if (theirs := transformers_gguf(variant, hf, path)) is not None:
        assert_same_model(ours, theirs, idx, 1e-4)


def test_tokenizer_encodes_like_the_original_and_transformers(gguf_pair):
    variant, _, folder, path = gguf_pair
    tok = load_gguf(path).tokenizer
    original = Tokenizer.load(folder / "hf/tokenizer.json")
    assert tok.encode(MIXED) == original.encode(MIXED)
    assert tok.decode(tok.encode(MIXED)) == MIXED
    if variant in TRANSFORMERS_TOKENIZER:
        theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert tok.encode(MIXED) == theirs.encode(MIXED, add_special_tokens=False)


def llamacpp_ids(llamacpp: Path, path: Path, text: str) -> list[int]:
    cmd = [str(llamacpp / "llama-tokenize"), "-m", str(path), "--stdin", "--ids", "--no-bos", "--log-disable"]
    return json.loads(subprocess.run(cmd, input=text, capture_output=True, text=True, check=True).stdout)


@pytest.fixture(scope="module")
def rich_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Merges across the places where the pre-tokenizers differ: digits after a space, contractions in
    capitals, runs of blanks before a newline (a 320-token vocabulary has none, and every regex passes)."""
    from nomoat.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("rich")
    lines = [f"{i} {i * 7} it's I'VE WE'LL {i * 13}.{i % 10}  \n\n   \t x{i}!!" for i in range(2000)]
    tok = train_tokenizer([SHAKESPEARE.read_text()[:30_000], *lines], vocab_size=RICH_V)
    tok.save(folder / "tokenizer.json")
    return folder


RICH_V = 1024


@pytest.mark.slow  # one conversion per pre-tokenizer
@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_every_pre_tokenizer_encodes_as_llamacpp_does(pre, rich_tokenizer_dir, llamacpp_source, llamacpp, tmp_path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            VARIANTS, "gpt2-rich", ("GPT2Config", "GPT2LMHeadModel", {**VARIANTS["gpt2"][2], "vocab_size": RICH_V})
        )
        make_hf("gpt2-rich", tmp_path / "hf", rich_tokenizer_dir)
    path = to_gguf(llamacpp_source, tmp_path / "hf", tmp_path / "model.gguf", pre=pre)
    tok = load_gguf(path).tokenizer
    for text in (MIXED, "In 1984, 12 of 345 said I'VE 6789  \n\n   \t xs\r\n", SHAKESPEARE.read_text()[:2000]):
        assert tok.encode(text) == llamacpp_ids(llamacpp, path, text)


def test_llama3_rope_scaling_is_recovered_from_rope_freqs():
    """Llama 3.1's published settings, through the factors convert_hf_to_gguf.py computes from them."""
    theta, dim, factor, lo, hi, L = 500000.0, 128, 8.0, 1.0, 4.0, 8192
    wavelen = 2 * math.pi * theta ** (np.arange(0, dim, 2) / dim)
    smooth = (L / wavelen - lo) / (hi - lo)
    factors = np.where(wavelen < L / hi, 1.0, np.where(wavelen > L / lo, factor, 1 / ((1 - smooth) / factor + smooth)))
    rope = _llama3_rope(factors.astype(np.float32), theta, dim, "test")
    assert rope == {
        "rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": lo, "high_freq_factor": hi,
        "original_max_position_embeddings": L,
    }  # fmt: skip
    with pytest.raises(UserError, match="Llama 3"):
        _llama3_rope(np.linspace(1.0, factor, dim // 2), theta, dim, "test")  # a ramp no llama3 setting makes


# Relative RMS error a type's round trip stays within on Gaussian weights (about twice what each type reaches).
QUANT_ERROR = {
    "Q8_0": 0.012, "Q6_K": 0.036, "Q5_0": 0.09, "Q5_1": 0.09, "Q5_K": 0.09, "Q4_0": 0.18, "Q4_1": 0.18,
    "Q4_K": 0.18, "Q3_K": 0.3, "Q2_K": 0.6, "F16": 5e-4, "BF16": 4e-3,
}  # fmt: skip


@pytest.fixture(scope="module")
def wide_f32(tmp_path_factory, tokenizer_dir, llamacpp_source) -> tuple[Path, Path]:
    """A LLaMA whose rows are 256 wide, the block size of the K-quants, so that none falls back to another type."""
    folder = tmp_path_factory.mktemp("wide")
    wide = {**VARIANTS["llama-gqa"][2], "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(VARIANTS, "wide", ("LlamaConfig", "LlamaForCausalLM", wide))
        make_hf("wide", folder / "hf", tokenizer_dir)
    return folder / "hf", to_gguf(llamacpp_source, folder / "hf", folder / "f32.gguf")


@pytest.mark.parametrize("qtype", list(QUANT_ERROR))
def test_quantized_round_trip_stays_within_the_types_error(qtype, wide_f32, llamacpp, tmp_path):
    hf_dir, f32 = wide_f32
    out = tmp_path / f"{qtype}.gguf"
    subprocess.run([str(llamacpp / "llama-quantize"), str(f32), str(out), qtype], check=True, capture_output=True)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == qtype  # llama-quantize fell back to nothing else here
    ours = load_gguf(out).model.state_dict()
    for name, w in load_hf(hf_dir).model.state_dict().items():
        if w.ndim == 2 and name.startswith("layers."):
            err = ((ours[name] - w).pow(2).mean() / w.pow(2).mean()).sqrt().item()
            assert err < QUANT_ERROR[qtype], (name, err)


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q4_0", "Q4_K_M"])
def test_nomoat_generate_on_llamacpps_files_equals_transformers(qtype, wide_f32, llamacpp, tmp_path):
    """`nomoat generate FILE.gguf --temperature 0` on files from llama.cpp's converter and llama-quantize (a
    Q4_K_M file mixes Q4_K and Q6_K) writes what transformers generates from the same file."""
    _, path = wide_f32
    if qtype != "F32":
        out = tmp_path / f"{qtype}.gguf"
        subprocess.run([str(llamacpp / "llama-quantize"), str(path), str(out), qtype], check=True, capture_output=True)
        path = out
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert {"F32": {"F32"}, "Q4_K_M": {"Q4_K", "Q6_K"}}.get(qtype, {qtype}) <= types, types
    prompt = "ROMEO: But soft, what light"
    cmd = [sys.executable, "-m", "nomoat", "generate", str(path), "--prompt", prompt, "--max-new-tokens", "32",
           "--temperature", "0", "--json"]  # fmt: skip
    text = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)["text"]
    tok = Tokenizer.load(wide_f32[0] / "tokenizer.json")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = tok.encode(prompt)
    out = theirs.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_id)
    assert len(out[0]) > len(ids) + 8 and text == tok.decode(out[0, len(ids) :].tolist())


def write_gguf(
    path: Path, arch: str = "llama", qtype: str = "F32", spm: tuple | None = None, **meta: str | int
) -> Path:
    """A one-layer LLaMA written with gguf-py directly, all weights of type qtype (zero bytes but for F32), with
    a 17-token BPE vocabulary or spm's (tokens, scores, token types); meta overrides metadata (None drops it)."""
    tokens = spm[0] if spm else ["<|endoftext|>", *[chr(c) for c in range(ord("a"), ord("a") + 16)]]
    w = gguf.GGUFWriter(str(path), arch)
    sizes = {"block_count": 1, "context_length": 64, "embedding_length": 32, "feed_forward_length": 32}
    values = {f"{arch}.{key}": value for key, value in {**sizes, "attention.head_count": 4}.items()}
    values |= {"tokenizer.ggml.model": "llama" if spm else "gpt2", "tokenizer.ggml.pre": None if spm else "gpt-2"}
    for key, value in {**values, **meta}.items():
        if value is not None:
            (w.add_string if isinstance(value, str) else w.add_uint32)(key, value)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_token_list(tokens)
    if spm:
        w.add_token_scores(spm[1])
        w.add_token_types(spm[2])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
    else:
        w.add_token_merges([])
    rng = np.random.default_rng(0)
    layer = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    names = ["token_embd", *(f"blk.0.{n}" for n in layer)]
    for name in names:
        rows = len(tokens) if name == "token_embd" else 32
        data = rng.standard_normal((rows, 32), dtype=np.float32)
        if qtype == "F32":
            w.add_tensor(f"{name}.weight", data)
        else:  # bytes of the right size: the loader refuses before it reads them
            t = gguf.GGMLQuantizationType[qtype]
            block, size = gguf.GGML_QUANT_SIZES[t]
            w.add_tensor(f"{name}.weight", np.zeros((rows, 32 // block * size), np.uint8), raw_dtype=t)
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{name}.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_written_by_gguf_py_loads(tmp_path):
    ckpt = load_gguf(write_gguf(tmp_path / "m.gguf"))
    assert ckpt.cfg.model.tie_embeddings and ckpt.tokenizer.encode("abc") == [1, 2, 3]


def spm_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary as llama.cpp stores one: <unk> <s> </s>, 256 byte tokens, then pieces
    scored best-first (those of a BPE trained with \u2581 for spaces), and one user-defined token."""
    trained = tokenizers.SentencePieceBPETokenizer()
    trained.train_from_iterator([SHAKESPEARE.read_text()[:30_000]], vocab_size=600, show_progress=False)
    pieces = [p for p, _ in sorted(trained.get_vocab().items(), key=lambda kv: kv[1]) if p != "<unk>"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<tool>"]
    types = [2, 3, 3, *[6] * 256, *[1] * len(pieces), 4]  # gguf-py's TokenType: UNKNOWN, CONTROL, BYTE, ...
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))] + [0.0]
    return tokens, scores, types


def test_sentencepiece_vocabulary_encodes_as_llamacpp_does(tmp_path, llamacpp):
    path = write_gguf(tmp_path / "spm.gguf", spm=spm_vocabulary())
    tok = load_gguf(path).tokenizer
    for text in (MIXED, "<s>Thou art<tool> here</s>  two  spaces\n", SHAKESPEARE.read_text()[:2000]):
        assert tok.encode(text) == llamacpp_ids(llamacpp, path, text), text
    assert tok.decode(tok.encode(MIXED)) == MIXED


def test_from_gguf_writes_a_checkpoint_that_loads_the_same(tmp_path):
    path = write_gguf(tmp_path / "spm.gguf", spm=spm_vocabulary())
    assert from_gguf(path, tmp_path / "ckpt") == tmp_path / "ckpt"
    back, direct = load_checkpoint(tmp_path / "ckpt"), load_gguf(path)
    idx = torch.randint(0, direct.cfg.model.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(back.model.eval()(idx), direct.model.eval()(idx))
    assert back.cfg == direct.cfg
    assert back.tokenizer.encode(MIXED) == direct.tokenizer.encode(MIXED)
    assert back.tokenizer.eos_token == "</s>" and back.tokenizer.bos_token == "<s>"
    assert back.tokenizer.encode("Thou")[0] != 1  # add_bos_token is for transformers: nomoat's encode adds none
    assert back.tokenizer.hf.encode("Thou").ids[0] == 1


def one_line_error(path: Path) -> str:
    with pytest.raises(UserError) as e:
        load_gguf(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
    return str(e.value)


def test_bad_input_is_one_line_user_error(tmp_path):
    good = write_gguf(tmp_path / "m.gguf").read_bytes()
    assert "no such" in one_line_error(tmp_path / "missing.gguf")
    for n, cut in enumerate((0, 10, len(good) // 3, len(good) - 100)):
        (tmp_path / f"cut{n}.gguf").write_bytes(good[:cut])
        assert "GGUF" in one_line_error(tmp_path / f"cut{n}.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all" * 10)
    one_line_error(tmp_path / "junk.gguf")
    assert "'mamba'" in one_line_error(write_gguf(tmp_path / "mamba.gguf", arch="mamba"))
    message = one_line_error(write_gguf(tmp_path / "iq4.gguf", qtype="IQ4_NL"))
    assert "IQ4_NL" in message and "token_embd.weight" in message
    assert "'bert'" in one_line_error(write_gguf(tmp_path / "bert.gguf", **{"tokenizer.ggml.model": "bert"}))
    assert "'tekken'" in one_line_error(write_gguf(tmp_path / "tekken.gguf", **{"tokenizer.ggml.pre": "tekken"}))
    assert "llama.block_count" in one_line_error(write_gguf(tmp_path / "nolayers.gguf", **{"llama.block_count": None}))
    assert "no tokenizer" in one_line_error(write_gguf(tmp_path / "notok.gguf", **{"tokenizer.ggml.model": None}))


def test_gguf_to_nomoat_to_gguf_gives_back_every_tensor_bit_for_bit(gguf_pair, tmp_path):
    """llama.cpp's converter's file, read by nomoat and written again: the same tensors, names and bytes, and
    the same hyperparameter and tokenizer keys (nomoat's own keys aside)."""
    from nomoat.convert.gguf_write import to_gguf as export

    variant, _, folder, path = gguf_pair
    again = export(load_gguf(path), tmp_path / "again.gguf")
    theirs, ours = gguf.GGUFReader(path), gguf.GGUFReader(again)
    mine = {t.name: t for t in ours.tensors}  # the order may differ: llama.cpp's follows the safetensors file
    assert sorted(mine) == sorted(t.name for t in theirs.tensors), variant
    for a in theirs.tensors:
        b = mine[a.name]
        assert a.tensor_type == b.tensor_type and list(a.shape) == list(b.shape), a.name
        assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    arch = theirs.fields["general.architecture"].contents()
    keys = [k for k in theirs.fields if k.startswith(("tokenizer.ggml.", f"{arch}."))]
    for key in keys:
        assert ours.fields[key].contents() == theirs.fields[key].contents(), (variant, key)


# ---- Q8_0 and Q4_0 files loaded as int8 / int4, never whole in fp32 ----

QUANT_VARIANTS = {  # the three layouts: LLaMA's permuted q/k, GPT-2's transposed fused qkv, NeoX's per-head qkv
    "llama": {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False, "n_kv_head": 2},
    "gpt2": {"norm": "layernorm", "mlp": "gelu_tanh", "pos_emb": "learned", "bias": True},
    "pythia": {"norm": "layernorm", "mlp": "gelu", "pos_emb": "rope", "bias": True, "rotary_pct": 0.25,
               "parallel_residual": True, "tie_embeddings": False},
}  # fmt: skip


def nomoat_gguf(folder: Path, variant: str, qtype: str) -> Path:
    """A tiny random model written by nomoat's own GGUF writer (llama.cpp's binaries are not needed)."""
    from nomoat.checkpoint import Checkpoint
    from nomoat.config import ModelConfig, RunConfig, TrainConfig
    from nomoat.convert.gguf_write import to_gguf as export
    from nomoat.model import Transformer
    from nomoat.tokenizer import train_tokenizer

    switches = QUANT_VARIANTS[variant]
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_head=4, d_model=64, d_ff=256, max_seq_len=64, **switches)
    torch.manual_seed(0)
    tok = train_tokenizer([SHAKESPEARE.read_text()[:20_000]], vocab_size=V)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint(folder, RunConfig(model=cfg, train=TrainConfig(seq_len=32)), Transformer(cfg).eval(), tok, None)
    return export(ckpt, folder / f"{variant}-{qtype}.gguf", qtype)


@pytest.mark.parametrize("variant", list(QUANT_VARIANTS))
def test_q4_0_blocks_become_int4_groups_as_they_are(variant, tmp_path, monkeypatch):
    """Each Q4_0 block is one int4 group (scale d, offset 0): no weight is requantized, every code is kept, and
    a layer computes the dequantized file's weights up to d rounded to bf16 and bf16 activations."""
    import nomoat.quant
    from nomoat.quant import Int4Linear

    path = nomoat_gguf(tmp_path, variant, "q4_0")
    ref = load_gguf(path).model.eval()  # dequantized to fp32, as before
    monkeypatch.setattr(nomoat.quant, "quantize_int4", lambda *_: pytest.fail("a Q4_0 weight was requantized"))
    ckpt = load_gguf(path, quantize="int4")
    model = ckpt.model
    assert ckpt.cfg.model.quantize == "int4"
    for i, block in enumerate(model.layers):
        mine = dict(block.self_attn.named_children()) | dict(block.mlp.named_children())
        theirs = dict(ref.layers[i].self_attn.named_children()) | dict(ref.layers[i].mlp.named_children())
        for name, layer in mine.items():
            assert isinstance(layer, Int4Linear), name
            parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
            weight = torch.cat([theirs[p].weight for p in parts.get(name, (name,))]).detach()
            q = layer.unpack()
            assert not q.offsets.any()
            torch.testing.assert_close(q.dequantize(), weight, rtol=2**-8, atol=0)  # d in bf16: 8 significant bits
            x = torch.randn(5, weight.shape[1])
            y = torch.nn.functional.linear(x, weight)
            if layer.bias is not None:
                y = y + layer.bias
            assert (layer(x) - y).norm() / y.norm() < 0.01
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(idx), model(idx)
    assert (got - want).norm() / want.norm() < 0.03


@pytest.mark.parametrize("variant", ["llama", "gpt2"])
def test_q8_0_loads_as_int8_rows(variant, tmp_path):
    """Q8_0 has a scale per 32 weights, the int8 kernel one per row: each tensor is requantized on its own."""
    from nomoat.quant import Int8Linear

    path = nomoat_gguf(tmp_path, variant, "q8_0")
    ref, model = load_gguf(path).model.eval(), load_gguf(path, quantize="int8").model
    assert all(isinstance(m, Int8Linear) for m in model.layers[0].self_attn.children())
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(idx), model(idx)
    assert (got - want).norm() / want.norm() < 0.03


def test_q4_0_file_to_int4_checkpoint_and_back(tmp_path, capsys):
    """`nomoat convert quantize FILE.gguf OUT --quantize int4` keeps the file's codes: the checkpoint computes
    exactly what the file loaded with --quantize int4 does; a damaged file is one line."""
    from nomoat.cli import main
    from nomoat.load import load_model

    path = nomoat_gguf(tmp_path, "llama", "q4_0")
    assert main(["convert", "quantize", str(path), str(tmp_path / "q4"), "--quantize", "int4"]) == 0
    idx = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "q4").model(idx), load_gguf(path, quantize="int4").model(idx))
    assert load_model(tmp_path / "q4").tokenizer.encode(MIXED) == load_gguf(path).tokenizer.encode(MIXED)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    capsys.readouterr()
    assert main(["convert", "quantize", str(cut), str(tmp_path / "bad"), "--quantize", "int4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nomoat: error: {cut}") and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
