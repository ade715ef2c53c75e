"""Tests for nomoat/data: corpus reading, deterministic shard building, shard checks and batch loading."""

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
import zstandard

from nomoat.data import (
    ShardSet,
    TokenLoader,
    build_shards,
    check_tokenizer_matches,
    encode,
    iter_eval_batches,
    load_manifest,
    read_documents,
)
from nomoat.errors import UserError
from nomoat.tokenizer import Tokenizer, train_tokenizer

SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"
TEXT = SHAKESPEARE.read_text()[:60_000]
DOCS = [p.strip() for p in TEXT.split("\n\n") if p.strip()]  # speeches as documents


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([TEXT], vocab_size=320)


def write_jsonl(path: Path, docs: list[str]) -> Path:
    lines = "".join(json.dumps({"text": d, "meta": {"i": i}}) + "\n" for i, d in enumerate(docs))
    if path.name.endswith(".zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    else:
        path.write_text(lines)
    return path


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def split_docs(shard_dir: Path, split: str, tok: Tokenizer) -> list[str]:
    stream = ShardSet(shard_dir, split).read(0, load_manifest(shard_dir)["splits"][split]["tokens"])
    assert stream[-1] == tok.eos_id  # every document ends in EOS
    ends = np.flatnonzero(stream == tok.eos_id)
    return [tok.decode(stream[a + 1 : b].tolist()) for a, b in zip([-1, *ends[:-1]], ends, strict=True)]


@pytest.fixture(scope="module")
def corpus(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200-document jsonl corpus built into small shards, shared by the loader tests."""
    root = tmp_path_factory.mktemp("corpus")
    jsonl = write_jsonl(root / "docs.jsonl", DOCS)
    build_shards([jsonl], tok, root / "shards", val_fraction=0.1, shard_tokens=5000, progress=False)
    return root / "shards"


# --- reading -----------------------------------------------------------------------------------------------


def test_read_txt_jsonl_zst_and_folder(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("whole file\nis one doc\n")
    write_jsonl(tmp_path / "a.jsonl", DOCS[:3])
    write_jsonl(tmp_path / "sub" / "c.jsonl.zst", DOCS[3:5])
    (tmp_path / "notes.md").write_text("ignored")
    assert list(read_documents(tmp_path / "b.txt")) == ["whole file\nis one doc\n"]
    assert list(read_documents(tmp_path / "a.jsonl")) == DOCS[:3]
    assert list(read_documents(tmp_path / "sub" / "c.jsonl.zst")) == DOCS[3:5]
    # sorted by path: a.jsonl, b.txt, sub/c.jsonl.zst
    assert list(read_documents(tmp_path)) == DOCS[:3] + ["whole file\nis one doc\n"] + DOCS[3:5]


def test_read_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        list(read_documents(tmp_path / "missing.txt"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UserError, match="x.csv: unknown corpus format"):
        list(read_documents(tmp_path / "x.csv"))
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\0\0"}\n')
    with pytest.raises(UserError, match=r"nul.jsonl:2: binary data \(a NUL byte\)"):
        list(read_documents(tmp_path / "nul.jsonl"))
    (tmp_path / "gz.jsonl").write_bytes(b'{"text": "ok"}\n\x1f\x8b\x08\xff\xfe\n')
    with pytest.raises(UserError, match=r"gz.jsonl:2: binary data \(not UTF-8\)"):
        list(read_documents(tmp_path / "gz.jsonl"))
    (tmp_path / "notext.jsonl").write_text('{"text": "ok"}\n\n{"body": "x"}\n')
    with pytest.raises(UserError, match=r'notext.jsonl:3: expected an object with a string "text"'):
        list(read_documents(tmp_path / "notext.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt: not UTF-8"):
        list(read_documents(tmp_path / "latin1.txt"))
    (tmp_path / "nul.txt").write_bytes(b"ab\0c")
    with pytest.raises(UserError, match=r"nul.txt: binary data \(a NUL byte at offset 2\)"):
        list(read_documents(tmp_path / "nul.txt"))


# --- building ----------------------------------------------------------------------------------------------


def test_chunked_encoding_equals_whole(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    text = SHAKESPEARE.read_text()
    monkeypatch.setattr(encode, "CHUNK_CHARS", 20_000)
    pieces = encode._chunks(text)
    assert len(pieces) > 20 and "".join(pieces) == text
    assert encode._chunking_is_exact(tok)
    assert sum(tok.encode_batch(pieces), []) == tok.encode(text)


def test_chunking_disabled_when_not_exact() -> None:
    # SentencePiece-style: every encode call starts a word, so pieces would not concatenate exactly.
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.add_special_tokens(["</s>"])
    hf.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
    hf.train_from_iterator([TEXT], tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False))
    assert not encode._chunking_is_exact(Tokenizer(hf))


def test_joined_documents_encode_as_separate_ones(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    # Short documents of one input and split share an encode input, joined by EOS's text; the shards must equal
    # those of one input per document. Documents start and end in whitespace, and some hold EOS's text.
    docs = [f"  {d}\n\n" if k % 3 else f"{d} <|endoftext|> x" for k, d in enumerate(DOCS)]
    jsonl = write_jsonl(tmp_path / "docs.jsonl", docs)
    assert encode._joining_is_exact(tok)
    build_shards([jsonl], tok, tmp_path / "joined", val_fraction=0.2, shard_tokens=3000, progress=False)
    monkeypatch.setattr(encode, "_joining_is_exact", lambda tok: False)
    build_shards([jsonl], tok, tmp_path / "apart", val_fraction=0.2, shard_tokens=3000, progress=False)
    assert file_hashes(tmp_path / "joined") == file_hashes(tmp_path / "apart")


def test_joining_disabled_when_eos_strips_whitespace() -> None:
    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens([tokenizers.AddedToken("<|endoftext|>", lstrip=True, rstrip=True)])
    hf.train_from_iterator([TEXT], tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False))
    assert not encode._joining_is_exact(Tokenizer(hf))


def test_build_single_txt_matches_whole_encoding(tok: Tokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(encode, "CHUNK_CHARS", 5000)  # many chunks, some shard cuts inside them
    monkeypatch.setattr(encode, "BATCH_CHARS", 12_000)  # a document spans several encode batches
    txt = tmp_path / "a.txt"
    txt.write_text(TEXT)
    m = build_shards([txt], tok, tmp_path / "o", val_fraction=0, shard_tokens=7000, progress=False)
    assert len(m["splits"]["train"]["shards"]) > 2
    stream = ShardSet(tmp_path / "o", "train").read(0, m["splits"]["train"]["tokens"])
    assert stream.tolist() == tok.encode(TEXT) + [tok.eos_id]


def test_batching_does_not_change_shards(tok: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches encode in a worker thread while the next is read: the output must not depend on where they cut.
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    build_shards([jsonl], tok, tmp_path / "whole", val_fraction=0.1, shard_tokens=3000, progress=False)
    monkeypatch.setattr(encode, "BATCH_CHARS", 3000)
    build_shards([jsonl], tok, tmp_path / "batched", val_fraction=0.1, shard_tokens=3000, progress=False)
    assert file_hashes(tmp_path / "whole") == file_hashes(tmp_path / "batched")


def test_build_is_byte_identical(tok: Tokenizer, tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "docs.jsonl", DOCS)
    build_shards([jsonl], tok, tmp_path / "a", val_fraction=0.1, shard_tokens=3000, progress=False)
    build_shards([jsonl], tok, tmp_path / "b", val_fraction=0.1, shard_tokens=3000, progress=False)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert a == b and len(a) > 3
    # Building again into an existing shard folder replaces it, with the same result and no leftovers.
    build_shards([jsonl], tok, tmp_path / "a", val_fraction=0.1, shard_tokens=3000, progress=False)
    assert file_hashes(tmp_path / "a") == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "docs.jsonl"]


def test_manifest_counts(tok: Tokenizer, corpus: Path) -> None:
    m = load_manifest(corpus)
    assert m["dtype"] == "uint16" and m["vocab_size"] == 320 and m["eos_id"] == tok.eos_id
    assert m["tokenizer_sha256"] == tok.sha256
    (inp,) = m["inputs"]
    assert inp["documents"] == len(DOCS) == sum(s["documents"] for s in m["splits"].values())
    assert inp["tokens"] == sum(s["tokens"] for s in m["splits"].values())
    assert inp["bytes"] == sum(len(d.encode()) for d in DOCS) == sum(s["bytes"] for s in m["splits"].values())
    for name, split in m["splits"].items():
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"])
        for s in split["shards"]:
            assert s["tokens"] <= 5000
            assert (corpus / s["file"]).stat().st_size == 2 * s["tokens"]  # uint16
        assert len(split_docs(corpus, name, tok)) == split["documents"]
    assert [s["file"] for s in m["splits"]["train"]["shards"]][:2] == ["train_000000.bin", "train_000001.bin"]


def test_content_split_is_deterministic(tok: Tokenizer, tmp_path: Path) -> None:
    shuffled = random.Random(0).sample(DOCS, len(DOCS))
    for name, docs in (("a", DOCS), ("b", shuffled)):
        jsonl = write_jsonl(tmp_path / f"{name}.jsonl", docs)
        build_shards([jsonl], tok, tmp_path / name, val_fraction=0.2, progress=False)
    val = split_docs(tmp_path / "a", "val", tok)
    assert sorted(val) == sorted(split_docs(tmp_path / "b", "val", tok))
    assert 0.1 * len(DOCS) < len(val) < 0.3 * len(DOCS)
    assert set(val).isdisjoint(split_docs(tmp_path / "a", "train", tok))


def test_val_inputs_form_the_val_split(tok: Tokenizer, tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl.zst", DOCS[:150])
    val = write_jsonl(tmp_path / "val.jsonl", DOCS[150:])
    m = build_shards([train], tok, tmp_path / "out", val_inputs=[val], progress=False)
    assert split_docs(tmp_path / "out", "train", tok) == DOCS[:150]
    assert split_docs(tmp_path / "out", "val", tok) == DOCS[150:]
    assert m["val_inputs"][0]["path"] == str(val) and m["val_inputs"][0]["documents"] == len(DOCS) - 150


def test_uint32_for_large_vocab(tmp_path: Path) -> None:
    vocab = {"<|endoftext|>": 0, "[UNK]": 1} | {f"w{i}": i for i in range(2, 70_000)}
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    (tmp_path / "a.txt").write_text("w69999 w2\nw65536 zzz\n")
    m = build_shards([tmp_path / "a.txt"], Tokenizer(hf), tmp_path / "out", val_fraction=0, progress=False)
    assert m["dtype"] == "uint32"
    assert ShardSet(tmp_path / "out", "train").read(0, 5).tolist() == [69999, 2, 65536, 1, 0]


def test_bad_json_lines_are_skipped_and_counted_unless_strict(
    tok: Tokenizer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", DOCS[:3])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text().replace("\n", '\n{"text": oops}\n', 1))
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        build_shards([bad], tok, tmp_path / "strict", val_fraction=0, progress=False, strict=True)
    assert not (tmp_path / "strict").exists()

    m = build_shards([bad], tok, tmp_path / "out", val_fraction=0, progress=False)
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning.startswith(f"warning: {bad}:2: not valid JSON (") and warning.endswith("; skipped")
    assert m["inputs"][0]["bad_lines"] == 1 and m["inputs"][0]["documents"] == 3
    clean = build_shards([good], tok, tmp_path / "clean", val_fraction=0, progress=False)
    assert clean["inputs"][0]["bad_lines"] == 0
    assert (tmp_path / "out/train_000000.bin").read_bytes() == (tmp_path / "clean/train_000000.bin").read_bytes()

    many = tmp_path / "many.jsonl"
    many.write_text('{"text": "ok"}\n' + "nope\n" * 12)
    assert build_shards([many], tok, tmp_path / "many", val_fraction=0, progress=False)["inputs"][0]["bad_lines"] == 12
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 11 and err[9].startswith(f"warning: {many}:11:")
    assert err[10] == "warning: 2 more bad lines skipped, 12 in all"


def test_build_errors(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing.txt: no such file"):
        build_shards([tmp_path / "missing.txt"], tok, tmp_path / "out", progress=False)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no documents in .*empty.txt"):
        build_shards([tmp_path / "empty.txt"], tok, tmp_path / "out", progress=False)
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="no documents in .*folder"):
        build_shards([tmp_path / "folder"], tok, tmp_path / "out", progress=False)
    (tmp_path / "a.txt").write_text("hello\n")
    no_eos = train_tokenizer([TEXT], vocab_size=300, special_tokens=())
    with pytest.raises(UserError, match="no end-of-document token"):
        build_shards([tmp_path / "a.txt"], no_eos, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="not a shard folder"):
        build_shards([tmp_path / "a.txt"], tok, tmp_path, progress=False)  # would delete a.txt and friends
    assert not list(tmp_path.glob(".*tmp*"))  # failed builds leave no temp folders


def test_check_tokenizer_matches(tok: Tokenizer, corpus: Path) -> None:
    m = load_manifest(corpus)
    check_tokenizer_matches(m, tok, "run.toml")
    other = train_tokenizer([TEXT], vocab_size=321)
    with pytest.raises(UserError, match=rf"run.toml: .*{m['tokenizer_sha256'][:12]}.*{other.sha256[:12]}"):
        check_tokenizer_matches(m, other, "run.toml")


# --- shard checks ------------------------------------------------------------------------------------------


def copy_shards(corpus: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in corpus.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_truncated_shard(corpus: Path, tmp_path: Path) -> None:
    shards = copy_shards(corpus, tmp_path / "s")
    data = (shards / "train_000001.bin").read_bytes()
    (shards / "train_000001.bin").write_bytes(data[:-2])
    message = f"train_000001.bin: has {len(data) - 2} bytes, manifest says {len(data)}"
    with pytest.raises(UserError, match=message):
        ShardSet(shards, "train", verify=False)


def test_corrupt_shard(corpus: Path, tmp_path: Path) -> None:
    shards = copy_shards(corpus, tmp_path / "s")
    data = bytearray((shards / "val_000000.bin").read_bytes())
    data[10] ^= 1
    (shards / "val_000000.bin").write_bytes(bytes(data))
    with pytest.raises(UserError, match="val_000000.bin: sha256 differs"):
        ShardSet(shards, "val")
    ShardSet(shards, "val", verify=False)  # opting out of the hash check


def test_missing_manifest_and_split(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such shard folder"):
        ShardSet(tmp_path / "nope", "train")
    with pytest.raises(UserError, match="manifest.json: missing"):
        ShardSet(tmp_path, "train")
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="manifest.json: not valid JSON"):
        load_manifest(tmp_path)
    with pytest.raises(UserError, match="no split 'test'"):
        ShardSet(corpus, "test")


def test_empty_val_split(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one document\n")
    with pytest.warns(UserWarning, match="empty val split"):  # one document: all of it is train
        build_shards([tmp_path / "a.txt"], tok, tmp_path / "out", progress=False)
    with pytest.raises(UserError, match="the val split is empty"):
        ShardSet(tmp_path / "out", "val")


# --- loading -----------------------------------------------------------------------------------------------


def test_loader_is_a_function_of_seed_and_step(corpus: Path) -> None:
    shards = ShardSet(corpus, "train")
    a = [x for x, _ in (next(TokenLoader(shards, 4, 32, seed=1)) for _ in range(2))]
    assert torch.equal(a[0], a[1])  # fresh loaders: same (seed, step 0), same batch
    loader = TokenLoader(shards, 4, 32, seed=1)
    x0, y0 = next(loader)
    x1, _ = next(loader)
    assert x0.shape == y0.shape == (4, 32) and x0.dtype == y0.dtype == torch.int64
    assert not torch.equal(x0, x1)
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # y is x shifted by one
    assert not torch.equal(next(TokenLoader(shards, 4, 32, seed=2))[0], x0)
    assert not torch.equal(next(TokenLoader(shards, 4, 32, seed=1, rank=1, world_size=2))[0], x0)


def test_loader_windows_stay_inside_a_shard(corpus: Path) -> None:
    shards = ShardSet(corpus, "train")
    full = [s for s in shards.shards if len(s) == 5000]
    loader = TokenLoader(shards, 8, 4999)  # a full shard offers exactly one window; the short last one none
    x, y = next(loader)
    for row_x, row_y in zip(x, y, strict=True):
        window = torch.cat([row_x, row_y[-1:]]).numpy()
        assert any(np.array_equal(window, s) for s in full)


def test_loader_resume(corpus: Path) -> None:
    shards = ShardSet(corpus, "train")
    straight = TokenLoader(shards, 2, 16, seed=3)
    for _ in range(5):
        next(straight)
    state = straight.state_dict()
    assert state == {"seed": 3, "step": 5, "rank": 0, "world_size": 1}
    resumed = TokenLoader(shards, 2, 16, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for _ in range(3):
        assert torch.equal(next(resumed)[0], next(straight)[0])
    with pytest.raises(UserError, match="seed 3, but this run uses seed 4"):
        TokenLoader(shards, 2, 16, seed=4).load_state_dict(state)


def test_loader_seq_len_too_long(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("short\n")
    build_shards([tmp_path / "a.txt"], tok, tmp_path / "out", val_fraction=0, progress=False)
    with pytest.raises(UserError, match="shorter seq_len"):
        TokenLoader(ShardSet(tmp_path / "out", "train"), 2, 64)


def test_eval_batches_cover_the_split_once(corpus: Path) -> None:
    shards = ShardSet(corpus, "val")
    stream = shards.read(0, shards.tokens)
    batches = list(iter_eval_batches(shards, 3, 64))
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert len(ys) == shards.tokens - 1
    assert np.array_equal(xs.numpy(), stream[:-1]) and np.array_equal(ys.numpy(), stream[1:])
    assert all(x.shape[1] == 64 for x, _ in batches[:-1]) and batches[-1][0].shape[0] == 1
    assert len(list(iter_eval_batches(shards, 3, 64, max_batches=2))) == 2
    again = iter_eval_batches(shards, 3, 64)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))  # deterministic


def test_eval_batches_short_split(tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("tiny")
    build_shards([tmp_path / "a.txt"], tok, tmp_path / "out", val_fraction=0, progress=False)
    shards = ShardSet(tmp_path / "out", "train")
    ((x, y),) = list(iter_eval_batches(shards, 4, 1024))
    assert x.shape == (1, shards.tokens - 1) and y[0, -1] == tok.eos_id
