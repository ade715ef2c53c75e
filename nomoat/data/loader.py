"""Batches from token shards: random windows for training, sequential windows for evaluation.

Shards are memory-mapped, so a corpus larger than RAM costs nothing to open. Training batch k is a pure
function of (seed, k, rank): resuming needs only the step, and there is no sampler state to checkpoint.
Not here: pinning, device transfer and prefetching; the training loop owns those.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nomoat.data.shards import load_manifest
from nomoat.errors import UserError
from nomoat.files import file_sha256


class ShardSet:
    """One split's shards, checked against the manifest and memory-mapped in order."""

    def __init__(self, shard_dir: str | Path, split: str, *, verify: bool = True):
        shard_dir = Path(shard_dir)
        self.manifest = load_manifest(shard_dir)
        info = self.manifest["splits"].get(split)
        if info is None:
            raise UserError(f"{shard_dir}: no split {split!r}; have {', '.join(self.manifest['splits'])}")
        if info["tokens"] == 0:
            raise UserError(f"{shard_dir}: the {split} split is empty")
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.shards: list[np.ndarray] = []
        for shard in info["shards"]:
            path = shard_dir / shard["file"]
            if not path.is_file():
                raise UserError(f"{path}: shard missing")
            size, expected = path.stat().st_size, shard["tokens"] * dtype.itemsize
            if size != expected:
                raise UserError(f"{path}: has {size} bytes, manifest says {expected}; rebuild the shards")
            if verify and file_sha256(path) != shard["sha256"]:
                raise UserError(f"{path}: sha256 differs from the manifest (corrupt); rebuild the shards")
            self.shards.append(np.memmap(path, dtype=dtype, mode="r"))
        self.tokens: int = info["tokens"]
        self.bytes: int = info["bytes"]  # UTF-8 bytes of the split's text, the denominator of bits per byte
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])  # offset of each shard in the stream

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's concatenated stream, as int64."""
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - self.starts[i]
            piece = self.shards[i][offset : offset + length]
            out.append(piece)
            start, length, i = start + len(piece), length - len(piece), i + 1
        return np.concatenate(out).astype(np.int64)


class TokenLoader:
    """Random windows drawn deterministically from (seed, step): batch k depends only on seed, k and rank,
    so resuming needs only the step."""

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        # A window is seq_len + 1 tokens inside one shard: shard i offers len - seq_len start positions.
        counts = [max(0, len(s) - seq_len) for s in shards.shards]
        if sum(counts) == 0:
            raise UserError(f"no shard holds seq_len + 1 = {seq_len + 1} tokens; use a shorter seq_len")
        self.cum_counts = np.cumsum(counts)

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.step, self.rank])
        picks = rng.integers(0, self.cum_counts[-1], size=self.batch_size)
        shard_ids = np.searchsorted(self.cum_counts, picks, side="right")
        offsets = picks - np.concatenate([[0], self.cum_counts[:-1]])[shard_ids]
        windows = np.stack(
            [self.shards.shards[s][o : o + self.seq_len + 1] for s, o in zip(shard_ids, offsets, strict=True)]
        ).astype(np.int64)  # (B, T + 1)
        self.step += 1
        return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise UserError(f"data loader state has seed {state['seed']}, but this run uses seed {self.seed}")
        self.step = int(state["step"])


def iter_eval_batches(
    shards: ShardSet, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over the whole split, in order: every token but the first is a target once.

    Windows run over the shards' concatenation (shards are cuts of one token stream). The last full-length
    batch may have fewer rows; the leftover targets then form one final batch of a single shorter row.
    """
    n_full, tail = divmod(shards.tokens - 1, seq_len)
    batches: Iterator[list[tuple[int, int]]] = (  # rows as (start, number of targets)
        [(row * seq_len, seq_len) for row in range(first, min(first + batch_size, n_full))]
        for first in range(0, n_full, batch_size)
    )
    if tail:
        batches = itertools.chain(batches, [[(n_full * seq_len, tail)]])
    for batch in itertools.islice(batches, max_batches):
        windows = np.stack([shards.read(start, length + 1) for start, length in batch])  # (B, T + 1)
        yield torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
