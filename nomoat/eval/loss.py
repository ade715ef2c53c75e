"""Held-out loss, perplexity and bits per byte: over a token split, or over text with rolling windows.

Bits per byte divides the summed negative log-likelihood by the UTF-8 bytes of the text it covers, so models
with different tokenizers compare fairly (the nanochat and nanoGPT figures are in these units).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nomoat.data import ShardSet, iter_eval_batches
from nomoat.errors import UserError
from nomoat.eval.lm import document_nll, rolling_nll
from nomoat.files import read_records
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer


@torch.no_grad()
def evaluate_loss(
    model: Transformer,
    shards: ShardSet,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    autocast: torch.autocast | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss in nats per token and bits per byte over the split (or its first max_batches). With progress,
    a bar on stderr: a whole validation split can take minutes."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    n_full, tail = divmod(shards.tokens - 1, seq_len)  # the batches iter_eval_batches will yield
    n_batches = -(-n_full // batch_size) + (1 if tail else 0)
    n_batches = min(n_batches, max_batches) if max_batches else n_batches
    batches = iter_eval_batches(shards, batch_size, seq_len, max_batches or None)
    with tqdm(batches, total=n_batches, desc="validation", unit="batch", leave=False, disable=not progress) as bar:
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                logits = model(x)
            total_nats += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            total_tokens += y.numel()
    model.train(was_training)
    # the bytes behind the predicted tokens, pro rata when only part of the split was scored
    bytes_covered = shards.bytes * total_tokens / shards.tokens
    return {
        "val_loss": total_nats / total_tokens,
        "val_bpb": total_nats / math.log(2) / bytes_covered,
        "val_tokens": float(total_tokens),
    }


def _documents(path: Path) -> Iterator[str]:
    """A .txt file is one document; a .jsonl file holds one {"text": ...} per line."""
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix != ".jsonl":
        yield path.read_text(encoding="utf-8")
        return
    for where, doc in read_records(path):
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            raise UserError(f"{where}: missing field 'text'")
        yield doc["text"]


def _summary(nats: float, tokens: int, n_bytes: float) -> dict[str, float]:
    loss = nats / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / n_bytes,
        "tokens": float(tokens),
        "bytes": float(n_bytes),
    }


def evaluate_text(
    model: Transformer,
    tokenizer: Tokenizer,
    paths: Sequence[str | Path],
    window: int = 0,
    stride: int = 0,
    batch_size: int = 4,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over .txt/.jsonl documents, each scored from an end-of-text token with
    rolling windows (window 0: the model's context; stride 0: the window, the harness's loglikelihood_rolling)."""
    window = window or model.cfg.max_seq_len
    stride = stride or window
    if window > model.cfg.max_seq_len or not 0 < stride <= window:
        raise UserError(f"need 0 < stride <= window <= {model.cfg.max_seq_len}, got window {window}, stride {stride}")
    if tokenizer.eos_id is None:
        raise UserError("the tokenizer has no end-of-text token to begin each document with")
    nats, tokens, n_bytes = 0.0, 0, 0
    for path in paths:
        for doc in _documents(Path(path)):
            ids = tokenizer.encode(doc)
            doc_nats, doc_tokens = document_nll(model, ids, tokenizer.eos_id, window, stride, batch_size)
            nats, tokens, n_bytes = nats + doc_nats, tokens + doc_tokens, n_bytes + len(doc.encode("utf-8"))
    if not tokens:
        raise UserError(f"{', '.join(map(str, paths))}: no text to score (empty)")
    return _summary(nats, tokens, n_bytes)


def evaluate_shards(
    model: Transformer, shards: ShardSet, window: int, stride: int, batch_size: int = 4
) -> dict[str, float]:
    """evaluate_text over a token split's stream: every token but the first is predicted once."""
    if window > model.cfg.max_seq_len or not 0 < stride <= window:
        raise UserError(f"need 0 < stride <= window <= {model.cfg.max_seq_len}, got window {window}, stride {stride}")
    nats, tokens = rolling_nll(model, lambda a, b: shards.read(a, b - a), shards.tokens, window, stride, batch_size)
    return _summary(nats, tokens, shards.bytes * tokens / shards.tokens)
