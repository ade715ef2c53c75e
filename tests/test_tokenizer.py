"""Tests for nomoat/tokenizer.py: byte-level BPE training, exact round trips, hashing and streaming decode."""

from pathlib import Path

import pytest
import tokenizers

from nomoat.errors import UserError
from nomoat.tokenizer import EOS, DecodeStream, StopStream, Tokenizer, decode_stream, train_tokenizer

SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"
SAMPLES = [
    "First Citizen:\nBefore we proceed",
    "héllo wörld 🙂",
    "  tabs\t\tand   runs \n\n\n",
    "",
    "日本語 ünïcödé",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer([SHAKESPEARE.read_text()[:100_000]], vocab_size=512)


def test_round_trip_is_exact(tok: Tokenizer) -> None:
    for text in SAMPLES:
        assert tok.decode(tok.encode(text)) == text


def test_vocab_and_eos(tok: Tokenizer) -> None:
    assert tok.vocab_size == 512
    assert tok.eos_id == 0  # special tokens come first
    assert tok.decode([tok.eos_id]) == EOS
    assert EOS not in tok.decode(tok.encode("a " * 50))  # encode adds no special tokens


def test_eos_is_detected_or_absent() -> None:
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({"</s>": 0, "[UNK]": 1}, unk_token="[UNK]"))
    assert Tokenizer(hf).eos_id == 0
    assert train_tokenizer(["abc"], vocab_size=260, special_tokens=()).eos_id is None
    with pytest.raises(UserError, match="not in the tokenizer's vocabulary"):
        Tokenizer(hf, eos_token="<eos>")


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(SAMPLES) == [tok.encode(t) for t in SAMPLES]


def test_save_load_same_ids_and_hash(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path / "tokenizer.json")
    for path in (tmp_path / "tokenizer.json", tmp_path):  # a folder holding tokenizer.json also loads
        loaded = Tokenizer.load(path)
        assert loaded.sha256 == tok.sha256
        assert [loaded.encode(t) for t in SAMPLES] == [tok.encode(t) for t in SAMPLES]


def test_training_is_deterministic(tmp_path: Path) -> None:
    text = SHAKESPEARE.read_text()[:50_000]
    train_tokenizer([text], vocab_size=400).save(tmp_path / "a.json")
    train_tokenizer([text], vocab_size=400).save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert train_tokenizer([text], vocab_size=401).sha256 != Tokenizer.load(tmp_path / "a.json").sha256


def test_stream_decode_holds_back_split_characters(tok: Tokenizer) -> None:
    text = "ok 🙂🙂 é!"
    ids = tok.encode(text)
    assert len(tok.encode("🙂")) > 1  # the emoji's four bytes are not one token in a 512 vocab
    pieces = list(decode_stream(tok, ids))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    stream = DecodeStream(tok)
    assert stream.push(tok.encode("🙂")[0]) == ""  # an incomplete character is held back


def test_stream_decode_flushes_broken_bytes(tok: Tokenizer) -> None:
    partial = tok.encode("🙂")[:1]
    assert "".join(decode_stream(tok, partial)) == tok.decode(partial)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(UserError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path)  # a folder without tokenizer.json
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="bad.json: not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")


def test_vocab_too_small() -> None:
    with pytest.raises(UserError, match="vocab_size 100"):
        train_tokenizer(["abc"], vocab_size=100)


def test_no_text_is_an_error_not_a_bare_byte_tokenizer() -> None:
    with pytest.raises(UserError, match="every document is empty"):
        train_tokenizer(["", ""], vocab_size=300)
    with pytest.raises(UserError, match="every document is empty"):
        train_tokenizer([], vocab_size=300)


def test_stop_stream_holds_back_a_stop_split_over_pieces() -> None:
    stream = StopStream(["</s>", "STOP"])
    out = [stream.push(p) for p in ["Hello <", "/", "x and S", "TO", "P more"]]
    assert out == ["Hello ", "", "</x and ", "", ""] and stream.stopped
    assert stream.flush() == "" and stream.push("after") == ""
    tail = StopStream(["STOP"])
    assert tail.push("ends with ST") == "ends with " and tail.flush() == "ST"  # generation ended: it was text
    assert StopStream().push("no stops") == "no stops"
    earliest = StopStream(["b", "ab"])
    assert earliest.push("xab") == "x"  # the stop that starts first wins


def test_decode_stream_cuts_at_stop_and_closes_the_ids() -> None:
    tok = train_tokenizer(["hello world, hello there"] * 10, 280)
    closed = []

    def ids():
        try:
            yield from tok.encode("hello world, hello there")
        finally:
            closed.append(True)

    assert "".join(decode_stream(tok, ids(), [", h"])) == "hello world" and closed == [True]
    assert "".join(decode_stream(tok, tok.encode("hello there"))) == "hello there"
