"""Held-out loss and bits per byte over a token split.

Bits per byte divides the summed negative log-likelihood by the UTF-8 bytes of the text it covers, so models
with different tokenizers compare fairly (the nanochat and nanoGPT figures are in these units).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nomoat.data import ShardSet, iter_eval_batches
from nomoat.model import Transformer


@torch.no_grad()
def evaluate_loss(
    model: Transformer,
    shards: ShardSet,
    batch_size: int,
    seq_len: int,
    max_batches: int | None = None,
    device: str | torch.device = "cpu",
    autocast: torch.autocast | None = None,
) -> dict[str, float]:
    """Mean loss in nats per token and bits per byte over the split (or its first max_batches)."""
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    for x, y in iter_eval_batches(shards, batch_size, seq_len, max_batches or None):
        x, y = x.to(device), y.to(device)
        if autocast is not None:
            with autocast:
                logits = model(x)
        else:
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
