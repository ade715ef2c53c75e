"""Tokenizer: train a byte-level BPE, or load any Hugging Face tokenizer.json, and encode/decode with it.

A thin wrapper over the Rust `tokenizers` library, which does the real work (and the multithreading).
Here too: `DecodeStream`, which turns token ids into text as they arrive during generation, and `StopStream`,
which cuts that text before a stop string; `decode_stream` chains the two for every command that streams text.
Not here: rendering chat templates (chat.py; the template itself travels with the tokenizer) and
special-token formatting; encode never adds special tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nomoat.errors import UserError

EOS = "<|endoftext|>"
# End-of-document tokens of the common open tokenizers (GPT-2/Qwen, Llama 3, Llama 2/Mistral, Gemma).
EOS_CANDIDATES = (EOS, "<|end_of_text|>", "</s>", "<eos>")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = (EOS,),
) -> Tokenizer:
    """Train a byte-level BPE on `texts`. Special tokens get the first ids, then 256 bytes, then merges."""
    if vocab_size < 256 + len(special_tokens):
        raise UserError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least 256 + specials")
    hf = tokenizers.Tokenizer(models.BPE())
    # No prefix space: the text round-trips exactly, and "\n" stays a pre-token boundary (see data/encode.py).
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        # All 256 bytes from the start, so that any text encodes, even characters the corpus never had.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = 0

    def counted() -> Iterator[str]:
        nonlocal seen
        for text in texts:
            seen += len(text)
            yield text

    hf.train_from_iterator(counted(), trainer)
    if not seen:  # the trainer would return the bare bytes and specials, as if nothing were wrong
        raise UserError("no text to train the tokenizer on: every document is empty")
    return Tokenizer(hf)


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def _token_text(token: object) -> str | None:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def _read_side_files(folder: Path) -> tuple[str | None, str | None, str | None]:
    """(chat template, bos token, eos token) from the files transformers keeps next to tokenizer.json.

    chat_template.jinja wins over tokenizer_config.json's chat_template, which is a string or a list of named
    templates ({"name": ..., "template": ...}) of which "default" is the one used, as in transformers."""
    config_file = folder / "tokenizer_config.json"
    config: dict = {}
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{config_file}: not valid JSON ({e})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        template = (folder / CHAT_TEMPLATE_FILE).read_text()
    template = template if isinstance(template, str) else None
    return template, _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))


class Tokenizer:
    """A Hugging Face tokenizer plus the one thing we need to know about it: which token ends a document."""

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        eos_token: str | None = None,
        chat_template: str | None = None,
        bos_token: str | None = None,
    ):
        self.hf = hf
        if eos_token is None:
            eos_token = next((t for t in EOS_CANDIDATES if hf.token_to_id(t) is not None), None)
        elif hf.token_to_id(eos_token) is None:
            raise UserError(f"eos token {eos_token!r} is not in the tokenizer's vocabulary")
        self.eos_token = eos_token
        # The Jinja chat template of a Hugging Face tokenizer (chat.py renders it), and the bos_token it may print.
        self.chat_template = chat_template
        self.bos_token = bos_token

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{path}: no such tokenizer file")
        try:
            hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(f"{path}: not a valid tokenizer.json ({reason})") from e
        template, bos, eos = _read_side_files(path.parent)
        # A chat model's eos is its end of turn (Llama 3's <|eot_id|>), named only in tokenizer_config.json.
        eos = eos if eos is not None and hf.token_to_id(eos) is not None else None
        return cls(hf, eos_token=eos, chat_template=template, bos_token=bos)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json to `path` (a file path, or a folder to hold tokenizer.json), and the chat
        template beside it as chat_template.jinja, the file transformers reads."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        self.hf.save(str(path))
        if self.chat_template is not None:
            (path.parent / CHAT_TEMPLATE_FILE).write_text(self.chat_template)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.hf.token_to_id(self.eos_token)

    @property
    def sha256(self) -> str:
        # Re-serialized with sorted keys, so the hash names the tokenizer, not one file's formatting.
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips character offsets, about twice as fast.
        encode = getattr(self.hf, "encode_batch_fast", self.hf.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)


class DecodeStream:
    """Incremental decoding: `push` one id, get back the new text ("" while a character is incomplete).

    Byte-level BPE can split one character over several tokens; decoding those alone gives U+FFFD, so text
    is held back until it decodes cleanly. Each piece is the difference between decoding a short window of
    recent ids with and without the new ones, which also keeps decoders that strip a leading space correct.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.read = 0  # ids[:read] have been emitted as text

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[: self.read])
        text = self.tokenizer.decode(self.ids)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        # Keep only the ids just emitted as context for the next piece.
        self.ids = self.ids[self.read :]
        self.read = len(self.ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """The text still held back (ends in U+FFFD if the ids really are a broken character)."""
        text = self.tokenizer.decode(self.ids)[len(self.tokenizer.decode(self.ids[: self.read])) :]
        self.ids, self.read = [], 0
        return text


class StopStream:
    """Text pieces in, text safe to show out, cut before the first stop string.

    The end of the text is held back while it could still grow into a stop string, so a stop that arrives
    split over several pieces is never shown; once one is found `stopped` is set and nothing more comes out."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.held = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[: min(hits)]
        keep = max(
            (n for s in self.stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
            default=0,
        )
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The held-back text: at the end of generation it can no longer become a stop string."""
        text, self.held = self.held, ""
        return "" if self.stopped else text


def decode_stream(tokenizer: Tokenizer, ids: Iterable[int], stops: Sequence[str] = ()) -> Iterator[str]:
    """Yield text pieces as ids arrive; the pieces join to `tokenizer.decode(all ids)` cut before the first of
    `stops`. Reaching a stop ends the iteration (and closes `ids`, so a generator behind it stops too)."""
    stream, stop = DecodeStream(tokenizer), StopStream(stops)
    for token_id in ids:
        if piece := stop.push(stream.push(token_id)):
            yield piece
        if stop.stopped:
            if hasattr(ids, "close"):
                ids.close()  # type: ignore[union-attr]
            return
    if tail := stop.push(stream.flush()) + stop.flush():
        yield tail
