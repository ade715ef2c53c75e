"""GGUF export: llama.cpp continues a prompt byte for byte as nomoat does for every architecture, tokenizes as
nomoat does, loads every quantized type (with perplexity within bounds), and bad input leaves no file."""

import contextlib
import dataclasses
import json
import math
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import gguf
import pytest
import tokenizers
import torch
from conftest import SHAKESPEARE
from tokenizers import decoders, models, pre_tokenizers, processors

from nomoat.checkpoint import Checkpoint, write_files
from nomoat.config import ModelConfig, RunConfig, TrainConfig, save_config
from nomoat.convert import to_hf
from nomoat.convert.gguf_read import load_gguf, read_metadata
from nomoat.convert.gguf_write import adapter_to_gguf, pre_tokenizer, to_gguf
from nomoat.errors import UserError
from nomoat.generate import generate_tokens
from nomoat.load import load_model
from nomoat.lora import add_lora, lora_layers, save_adapter
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer, train_tokenizer

V = 320
ROPE = {"norm": "rmsnorm", "mlp": "swiglu", "pos_emb": "rope", "bias": False, "init": "normal"}
NEOX = {"norm": "layernorm", "mlp": "gelu", "pos_emb": "rope", "bias": True, "rotary_pct": 0.25, "init": "neox"}
VARIANTS = {
    "llama-gqa": {**ROPE, "n_kv_head": 2, "tie_embeddings": False, "rope_theta": 5000.0},
    "llama3-tied": {**ROPE, "rope_scaling": "llama3", "rope_theta": 500000.0, "rope_original_max_seq_len": 16},
    "qwen2-tied": {**ROPE, "n_kv_head": 2, "qkv_bias": True},
    "qwen3": {**ROPE, "n_kv_head": 2, "qk_norm": True, "head_dim": 16, "tie_embeddings": False},  # head_dim != C / H
    "gpt2": {"norm": "layernorm", "mlp": "gelu_tanh", "pos_emb": "learned", "bias": True},
    "pythia": {**NEOX, "parallel_residual": True, "tie_embeddings": False},
    "neox-sequential": {**NEOX, "parallel_residual": False, "tie_embeddings": False, "rope_theta": 20000.0},
}
PROMPT = "ROMEO: But soft, what light"
MIXED = "héllo  wörld\n\n\n  def f(x):\treturn 12345 + 3.14159  # ok?\r\n🦙 日本語 naïve café   end"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = train_tokenizer([SHAKESPEARE.read_text()[:50_000]], vocab_size=V)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    return tok


def make_ckpt(folder: Path, tokenizer: Tokenizer, seed: int = 0, d_model: int = 32, vocab_size: int = V, **switches):
    cfg = ModelConfig(
        vocab_size=vocab_size, n_layer=2, n_head=4, d_model=d_model, d_ff=4 * d_model, max_seq_len=64, **switches
    )
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # large weights give peaked logits, so that greedy choices are far from ties
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if "norm" in name else p.normal_(0.0, 0.3)
    folder.mkdir(parents=True, exist_ok=True)
    return Checkpoint(folder, RunConfig(model=cfg, train=TrainConfig(seq_len=32)), model, tokenizer, None)


@contextlib.contextmanager
def llama_server(llamacpp: Path, path: Path, *extra: str) -> Iterator[str]:
    """llama-server on the file, with an fp32 KV cache so that it computes at the precision we do. (The server,
    not llama-completion: that one logs its text from a thread and may exit before the last of it is out.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-c", "64", "-np", "1", "-t", "2",
            "-ctk", "f32", "-ctv", "f32", "--no-warmup", "--no-webui", *extra]  # fmt: skip
    with open(path.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen([str(llamacpp / "llama-server"), *args], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=1) as reply:
                    if reply.status == 200:
                        break
            assert proc.poll() is None, path.with_suffix(".log").read_text(errors="replace")[-2000:]
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def greedy(url: str, ids: list[int], n: int) -> list[int]:
    """Token ids llama.cpp generates greedily after the prompt ids (stopping at end-of-text, as we do)."""
    body = {"prompt": ids, "n_predict": n, "temperature": 0, "return_tokens": True, "cache_prompt": False}
    request = urllib.request.Request(
        f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())["tokens"]


def run(llamacpp: Path, tool: str, *args: str) -> str:
    done = subprocess.run([str(llamacpp / tool), *args], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout + done.stderr


@pytest.mark.parametrize("variant", ["llama-gqa", "llama3-tied", "qwen3", "gpt2", "pythia"])
def test_streamed_export_is_the_loaded_export_byte_for_byte(variant, tokenizer, tmp_path):
    """to-gguf reads a checkpoint or Hugging Face folder as a meta skeleton and streams the weights from the
    files a layer at a time; the file must be the one an export of the loaded model writes."""
    ckpt = make_ckpt(tmp_path / "ckpt", tokenizer, **VARIANTS[variant])
    write_files(ckpt.path, ckpt.model, ckpt.cfg, tokenizer)
    to_hf(ckpt, tmp_path / "hf")
    for folder in (ckpt.path, tmp_path / "hf"):
        loaded = load_model(folder)
        skeleton = load_model(folder, device="meta")
        assert skeleton.weights is not None and all(p.is_meta for p in skeleton.model.parameters())
        for qtype in ("f32", "q8_0"):
            to_gguf(loaded, tmp_path / "loaded.gguf", qtype)
            to_gguf(skeleton, tmp_path / "streamed.gguf", qtype)
            assert gguf_contents(tmp_path / "streamed.gguf") == gguf_contents(tmp_path / "loaded.gguf"), (folder, qtype)


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors as (type, shape, bytes)) of a GGUF file, whatever the order of its tensor table."""
    reader = gguf.GGUFReader(path)
    meta = {k: (f.types, [bytes(f.parts[i]) for i in f.data]) for k, f in reader.fields.items()}
    meta = {k: v for k, v in meta.items() if not k.startswith("GGUF.")}  # the table's counts and offsets
    tensors = {t.name: (t.tensor_type, tuple(t.shape), t.data.tobytes()) for t in reader.tensors}
    return meta, tensors


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_llamacpp_continues_as_nomoat_does(variant, tokenizer, tmp_path, llamacpp):
    ckpt = make_ckpt(tmp_path / variant, tokenizer, **VARIANTS[variant])
    path = to_gguf(ckpt, tmp_path / f"{variant}.gguf")
    ids = tokenizer.encode(PROMPT)
    mine = list(generate_tokens(ckpt.model, ids, 32, temperature=0, eos_id=tokenizer.eos_id))
    assert len(mine) > 8
    with llama_server(llamacpp, path) as url:
        assert greedy(url, ids, 32) == mine


def test_llamacpp_tokenizes_as_nomoat_does(tokenizer, tmp_path, llamacpp):
    path = to_gguf(make_ckpt(tmp_path / "m", tokenizer, **VARIANTS["gpt2"]), tmp_path / "m.gguf")
    (tmp_path / "mixed.txt").write_text(MIXED)
    out = run(llamacpp, "llama-tokenize", "-m", str(path), "-f", str(tmp_path / "mixed.txt"), "--ids", "--log-disable")
    assert json.loads(out.strip().splitlines()[-1]) == tokenizer.encode(MIXED)


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def llama3_tokenizer(source: Path) -> Tokenizer:
    """Llama 3's tokenizer.json rebuilt from the vocabulary llama.cpp ships for its own tests (its tokens and
    merges, Meta's split regex, the <|begin_of_text|> template): a real imported tokenizer, offline."""
    fields = {k: f.contents() for k, f in gguf.GGUFReader(source / "models/ggml-vocab-llama-bpe.gguf").fields.items()}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]
    hf = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=True))
    split = pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated")
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([t for t, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.CONTROL])
    bos = "<|begin_of_text|>"
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, hf.token_to_id(bos))])
    return Tokenizer(hf, eos_token="<|end_of_text|>", bos_token=bos)


@pytest.mark.slow  # gguf's reader takes about ten seconds over Llama 3's 128k tokens and 280k merges
def test_imported_llama3_tokenizer_is_found_by_its_hash(tmp_path, llamacpp, llamacpp_source):
    tok = llama3_tokenizer(llamacpp_source)
    assert pre_tokenizer(tok) == "llama-bpe"
    cfg = {**ROPE, "tie_embeddings": True}
    ckpt = make_ckpt(tmp_path / "m", tok, **cfg, vocab_size=tok.vocab_size)
    path = to_gguf(ckpt, tmp_path / "m.gguf", "f16")
    (tmp_path / "mixed.txt").write_text(MIXED)
    out = run(llamacpp, "llama-tokenize", "-m", str(path), "-f", str(tmp_path / "mixed.txt"), "--ids", "--log-disable")
    ids = tok.hf.encode(MIXED).ids
    assert ids[0] == tok.hf.token_to_id("<|begin_of_text|>")  # add_bos_token and bos id reached llama.cpp too
    assert json.loads(out.strip().splitlines()[-1]) == ids


def test_metadata_follows_llamacpp_converter(tokenizer, tmp_path):
    ckpt = make_ckpt(tmp_path / "m", tokenizer, **VARIANTS["llama3-tied"])
    lineage = {"base": None, "data": [{"name": "tinyshakespeare", "license": "public domain"}]}
    reader = gguf.GGUFReader(to_gguf(ckpt, tmp_path / "m.gguf", "q8_0", lineage=lineage))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.tokens"]) == V and fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert json.loads(fields["nomoat.lineage"]) == lineage
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied: llama.cpp reads the token embedding as the output head


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0"])
def test_quantized_exports_load_in_llamacpp(qtype, tokenizer, tmp_path, llamacpp):
    ckpt = make_ckpt(tmp_path / "m", tokenizer, **VARIANTS["qwen2-tied"])
    path = to_gguf(ckpt, tmp_path / f"m-{qtype}.gguf", qtype)
    with llama_server(llamacpp, path) as url:
        assert 0 < len(greedy(url, tokenizer.encode(PROMPT), 8)) <= 8


def trained_llama(folder: Path, tokenizer: Tokenizer, text: str, steps: int = 150) -> Checkpoint:
    """A tiny LLaMA trained for a moment, so that its perplexity means something and quantization moves it."""
    cfg = ModelConfig(vocab_size=V, n_layer=2, n_head=4, d_model=64, d_ff=128, max_seq_len=256, **ROPE)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.tensor(tokenizer.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - 129, (8,))
        batch = torch.stack([ids[s : s + 129] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Checkpoint(folder, RunConfig(model=cfg, train=TrainConfig(seq_len=128)), model.eval(), tokenizer, None)


def nomoat_perplexity(model: Transformer, ids: list[int], n_ctx: int, chunks: int) -> float:
    """llama-perplexity's measure: per chunk of n_ctx tokens, the mean loss on the second half's tokens."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(chunks):
            chunk = torch.tensor(ids[c * n_ctx : (c + 1) * n_ctx])
            logp = model(chunk[None])[0].log_softmax(-1)
            first = n_ctx // 2
            nll -= logp[first : n_ctx - 1].gather(1, chunk[first + 1 :, None]).sum().item()
            count += n_ctx - 1 - first
    return math.exp(nll / count)


def llama_perplexity(llamacpp: Path, path: Path, text: Path, n_ctx: int, chunks: int) -> float:
    """llama-perplexity's final estimate. It logs from a thread that can lose the last lines at exit, so a run
    whose estimate did not come out is repeated."""
    args = ["-m", str(path), "-f", str(text), "-c", str(n_ctx), "--chunks", str(chunks), "-b", str(n_ctx), "-t", "2",
            "-ctk", "f32", "-ctv", "f32"]  # fmt: skip
    for _ in range(5):
        out = run(llamacpp, "llama-perplexity", *args)
        if "Final estimate: PPL = " in out:
            return float(out.split("Final estimate: PPL = ")[1].split()[0])
    raise AssertionError(f"llama-perplexity printed no estimate: {out[-2000:]}")


@pytest.mark.slow  # trains a tiny model for a few seconds, then runs llama-perplexity five times
def test_perplexity_within_bounds(tokenizer, tmp_path, llamacpp):
    text = SHAKESPEARE.read_text()
    ckpt = trained_llama(tmp_path / "m", tokenizer, text[:50_000])
    held_out = text[-12_000:]
    (tmp_path / "val.txt").write_text(held_out)
    n_ctx, chunks = 256, 4
    ours = nomoat_perplexity(ckpt.model, tokenizer.encode(held_out), n_ctx, chunks)
    for qtype, bound in {"f32": 0.001, "f16": 0.01, "bf16": 0.01, "q8_0": 0.02, "q4_0": 0.08}.items():
        path = to_gguf(ckpt, tmp_path / f"m-{qtype}.gguf", qtype)
        theirs = llama_perplexity(llamacpp, path, tmp_path / "val.txt", n_ctx, chunks)
        assert abs(theirs / ours - 1) < bound, (qtype, theirs, ours)


def test_bad_input_is_one_line_and_leaves_no_file(tokenizer, tmp_path):
    ckpt = make_ckpt(tmp_path / "m", tokenizer, d_model=48, **VARIANTS["llama-gqa"])
    out = tmp_path / "m.gguf"
    with pytest.raises(UserError, match="unknown GGUF type 'q3_k'") as e:
        to_gguf(ckpt, out, "q3_k")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"tensor token_embd.weight has rows of 48 .* f16") as e:
        to_gguf(ckpt, out, "q4_0")
    assert "\n" not in str(e.value)
    assert list(tmp_path.glob("*.gguf*")) == [] and list(tmp_path.glob(".*")) == []
    out.write_bytes(b"an older export")  # a failed export leaves what was there
    with pytest.raises(UserError):
        to_gguf(ckpt, out, "q8_0")
    assert out.read_bytes() == b"an older export"
    assert to_gguf(ckpt, out, "f16") == out and out.read_bytes()[:4] == b"GGUF"


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """A SentencePiece-style tokenizer (▁ for spaces, byte fallback, <unk> <s> </s>, a user-defined <tool>), as
    nomoat reads one from a Llama 2-style GGUF: the layout of Llama 2's, Mistral's and TinyLlama's tokenizer.json."""
    from test_gguf_read import spm_vocabulary, write_gguf  # the vocabulary the import tests read

    return load_gguf(write_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", spm=spm_vocabulary())).tokenizer


def test_sentencepiece_vocabulary_exports_as_llamas_spm(spm_tokenizer, tmp_path, llamacpp):
    from test_gguf_read import llamacpp_ids

    n = spm_tokenizer.vocab_size
    ckpt = make_ckpt(tmp_path / "m", spm_tokenizer, vocab_size=n, **VARIANTS["llama-gqa"])
    path = to_gguf(ckpt, tmp_path / "m.gguf")
    meta = read_metadata(path)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.token_type"][3:259] == [6] * 256 and meta["tokenizer.ggml.unknown_token_id"] == 0
    for text in (MIXED, "<s>Thou art<tool> here</s>  two  spaces\n", SHAKESPEARE.read_text()[:3000]):
        assert llamacpp_ids(llamacpp, path, text) == spm_tokenizer.encode(text), text
    ids = spm_tokenizer.encode(PROMPT)
    mine = list(generate_tokens(ckpt.model, ids, 32, temperature=0, eos_id=spm_tokenizer.eos_id))
    assert len(mine) > 8
    with llama_server(llamacpp, path) as url:
        assert greedy(url, ids, 32) == mine


def test_sentencepiece_vocabulary_survives_gguf_to_nomoat_to_gguf(spm_tokenizer, tmp_path):
    """Written out and read back, the tokenizer encodes as before (the scores rank merges as its merges do)."""
    ckpt = make_ckpt(tmp_path / "m", spm_tokenizer, vocab_size=spm_tokenizer.vocab_size, **VARIANTS["llama-gqa"])
    back = load_gguf(to_gguf(ckpt, tmp_path / "m.gguf")).tokenizer
    for text in (MIXED, "<s>Thou art<tool> here</s>  two  spaces\n", SHAKESPEARE.read_text()[:3000]):
        assert back.encode(text) == spm_tokenizer.encode(text)


def test_unfaithful_sentencepiece_tokenizers_are_refused(spm_tokenizer, tmp_path):
    ckpt = make_ckpt(tmp_path / "m", spm_tokenizer, vocab_size=spm_tokenizer.vocab_size, **VARIANTS["llama-gqa"])
    spec = json.loads(spm_tokenizer.hf.to_str())
    dropped = spec["model"]["merges"].pop(len(spec["model"]["merges"]) // 2)  # a split SPM would still join
    ckpt.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(UserError, match="merges are not SentencePiece's") as e:
        to_gguf(ckpt, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and repr("".join(dropped)) in str(e.value)
    spec = json.loads(spm_tokenizer.hf.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    ckpt.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(UserError, match="prepend_scheme 'first' has no faithful llama.cpp form") as e:
        to_gguf(ckpt, tmp_path / "m.gguf")
    assert "\n" not in str(e.value) and not (tmp_path / "m.gguf").exists()


def test_unfaithful_tokenizers_are_refused(tokenizer, tmp_path):
    ckpt = make_ckpt(tmp_path / "m", tokenizer, **VARIANTS["gpt2"])
    spec = json.loads(tokenizer.hf.to_str())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    ckpt.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(UserError, match="pre-tokenizer .*Whitespace.* matches none") as e:
        to_gguf(ckpt, tmp_path / "m.gguf")
    assert "\n" not in str(e.value)
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    ckpt.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))
    with pytest.raises(UserError, match="SentencePiece-style"):
        to_gguf(ckpt, tmp_path / "m.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-tied", "qwen3"])
def test_lora_adapter_applies_in_llamacpp(variant, tokenizer, tmp_path, llamacpp):
    ckpt = make_ckpt(tmp_path / "m", tokenizer, **VARIANTS[variant])
    base = to_gguf(ckpt, tmp_path / "base.gguf")
    ids = tokenizer.encode(PROMPT)
    plain = list(generate_tokens(ckpt.model, ids, 32, temperature=0, eos_id=tokenizer.eos_id))
    add_lora(ckpt.model, rank=4, alpha=8.0)
    with torch.no_grad():  # a fresh adapter is zero; this one must change what the model says
        for layer in lora_layers(ckpt.model).values():
            layer.lora_B.normal_(0.0, 0.3)
    tuned = list(generate_tokens(ckpt.model, ids, 32, temperature=0, eos_id=tokenizer.eos_id))
    assert tuned != plain
    adapter = adapter_to_gguf(ckpt, tmp_path / "lora.gguf")
    fields = {k: f.contents() for k, f in gguf.GGUFReader(adapter).fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["adapter.lora.alpha"]) == ("adapter", "lora", 8.0)
    with llama_server(llamacpp, base, "--lora", str(adapter)) as url:
        assert greedy(url, ids, 32) == tuned
    save_adapter(ckpt.model, tmp_path / "m")  # the same adapter from a checkpoint folder on disk
    save_config(ckpt.cfg, tmp_path / "m/config.toml")
    from_folder = gguf.GGUFReader(adapter_to_gguf(tmp_path / "m", tmp_path / "lora2.gguf"))
    tensors = {t.name: t.data.tobytes() for t in gguf.GGUFReader(adapter).tensors}
    assert {t.name: t.data.tobytes() for t in from_folder.tensors} == tensors


def test_adapter_refusals(tokenizer, tmp_path):
    ckpt = make_ckpt(tmp_path / "m", tokenizer, **VARIANTS["gpt2"])
    with pytest.raises(UserError, match="no LoRA layers"):
        adapter_to_gguf(ckpt, tmp_path / "a.gguf")
    add_lora(ckpt.model, rank=2, alpha=4.0)
    with pytest.raises(UserError, match="holds LoRA layers: merge them"):
        to_gguf(ckpt, tmp_path / "m.gguf")
    with pytest.raises(UserError, match="LLaMA, Mistral, Qwen2 and Qwen3 only, not GPT2LMHeadModel"):
        adapter_to_gguf(ckpt, tmp_path / "a.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


# ChatML's markers in a layout of its own: were llama.cpp to fall back to its built-in ChatML, the prompt, and
# so the greedy answer, would differ from nomoat's.
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] | upper }}: {{ m['content'] }}<|im_end|>\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>ASSISTANT: {% endif %}"
)


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.loads(reply.read())


def test_llama_server_chats_through_the_exported_template_as_nomoat_serve_does(tmp_path, llamacpp):
    from nomoat.serve.app import build_app, running

    tok = train_tokenizer([SHAKESPEARE.read_text()[:50_000]], V, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                              "<|im_end|>"])  # fmt: skip
    tok.chat_template = TEMPLATE
    ckpt = make_ckpt(tmp_path / "chat", tok, **VARIANTS["llama-gqa"])
    path = to_gguf(ckpt, tmp_path / "chat.gguf")
    body = {"messages": [{"role": "user", "content": "What light through yonder window breaks?"}],
            "temperature": 0, "max_tokens": 12}  # fmt: skip
    with running(build_app(ckpt.model, tok, "chat")) as url:
        ours = post(f"{url}/v1/chat/completions", {**body, "model": "chat"})["choices"][0]["message"]["content"]
    with llama_server(llamacpp, path, "--jinja") as url:
        theirs = post(f"{url}/v1/chat/completions", body)["choices"][0]["message"]["content"]
    log = path.with_suffix(".log").read_text(errors="replace").lower()
    assert theirs == ours and ours
    assert "fallback" not in log and "failed to" not in log, log[-2000:]


def test_qwen3_exports_as_llamacpps_qwen3_and_reads_back_the_same(tokenizer, tmp_path):
    """QK-norm goes out as llama.cpp's qwen3: attn_q_norm/attn_k_norm in F32, q and k rows as they are (its qwen3
    rotates halves as Hugging Face does, so no LLaMA permutation), head_dim as key/value_length; read back, the
    same config and the same logits."""
    ckpt = make_ckpt(tmp_path / "m", tokenizer, **VARIANTS["qwen3"])
    path = to_gguf(ckpt, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "qwen3"
    assert fields["qwen3.attention.key_length"] == fields["qwen3.attention.value_length"] == 16
    tensors = {t.name: t for t in reader.tensors}
    attn = ckpt.model.layers[1].self_attn
    for name, weight in (("attn_q_norm", attn.q_norm.weight), ("attn_k_norm", attn.k_norm.weight),
                         ("attn_q", attn.q_proj.weight), ("attn_k", attn.k_proj.weight)):  # fmt: skip
        t = tensors[f"blk.1.{name}.weight"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert torch.equal(torch.from_numpy(t.data.copy()).reshape(weight.shape), weight.detach()), name
    back = load_gguf(path)
    assert back.cfg.model.norm_eps == pytest.approx(ckpt.cfg.model.norm_eps)  # GGUF holds it as a float32
    assert dataclasses.replace(back.cfg.model, norm_eps=ckpt.cfg.model.norm_eps) == ckpt.cfg.model
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back.model.eval()(idx), ckpt.model(idx), rtol=0, atol=1e-6)
