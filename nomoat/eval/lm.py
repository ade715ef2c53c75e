"""Scoring token sequences: continuation log-likelihoods and rolling-window negative log-likelihood.

The semantics are lm-evaluation-harness's (`_loglikelihood_tokens`, `loglikelihood_rolling`), so the numbers agree;
the speed comes from running a shared context once for all its continuations (a KV cache copied per choice) and
from applying the output head only at the positions that are scored. Task formats live in `tasks.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nomoat.model import KVCache, Transformer

Request = tuple[Sequence[int], Sequence[int]]  # (context token ids, continuation token ids)


def _logprobs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """Summed log-probability of targets (T,) after hidden (T, C), and whether each was the argmax."""
    logp = F.log_softmax(head(hidden).float(), dim=-1)  # (T, V)
    ll = logp.gather(-1, targets[:, None]).sum().item()
    return ll, bool((logp.argmax(-1) == targets).all())


@torch.no_grad()
def score_requests(
    model: Transformer, requests: Sequence[Request], window: int | None = None, budget: int = 2048
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each continuation given its context, as the harness computes them.

    Requests sharing a context run it once; contexts of similar length are batched up to `budget` tokens a
    forward. When context + continuation exceed the window (default: the model's context), the input is cut from
    the left as the harness does: (context + continuation)[-(window + 1):][:-1]."""
    window = min(window or model.cfg.max_seq_len, model.cfg.max_seq_len)
    device = model.device
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ValueError(f"request {i}: context and continuation must both hold tokens")
        groups.setdefault(tuple(ctx), []).append(i)
    out: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    longest = {c: len(c) + max(len(requests[i][1]) for i in m) - 1 for c, m in groups.items()}
    fits = [(list(c), m) for c, m in groups.items() if longest[c] <= window]
    fits.sort(key=lambda group: -len(group[0]))  # similar lengths together: little padding
    was_training = model.training
    model.eval()
    head = model.lm_head  # applied only where a token is scored
    chunk: list[tuple[list[int], list[int]]] = []
    for group in [*fits, None]:
        if chunk and (group is None or not _fits(chunk + [group], requests, window, budget)):
            conts = [[list(requests[i][1]) for i in members] for _, members in chunk]
            scores = _score_groups(model, head, [ctx for ctx, _ in chunk], conts, device, budget)
            for (_, members), group_scores in zip(chunk, scores, strict=True):
                for i, score in zip(members, group_scores, strict=True):
                    out[i] = score
            chunk = []
        if group is not None:
            chunk.append(group)
    for ctx, members in groups.items():
        if longest[ctx] <= window:
            continue  # scored above
        for i in members:
            cont = list(requests[i][1])
            inp = (list(ctx) + cont)[-(window + 1) :][:-1]
            hidden = model(torch.tensor([inp], device=device), hidden=True)[0, -len(cont) :]  # (m, C)
            out[i] = _logprobs(head, hidden, torch.tensor(cont, device=device))
    model.train(was_training)
    return out


def _fits(chunk: list[tuple[list[int], list[int]]], requests: Sequence[Request], window: int, budget: int) -> bool:
    """Whether the padded context batch stays within budget, and every row within the window."""
    n_ctx = max(len(ctx) for ctx, _ in chunk)
    n_cont = max(len(requests[i][1]) for _, members in chunk for i in members)
    return n_ctx + n_cont - 1 <= window and n_ctx * len(chunk) <= budget


def _score_groups(
    model: Transformer,
    head: nn.Module,
    contexts: list[list[int]],
    conts: list[list[list[int]]],
    device: torch.device,
    budget: int,
) -> list[list[tuple[float, bool]]]:
    """One forward over the contexts into a KV cache, then the continuations in batches of similar length, each row
    starting from a copy of its context's keys and values at its own position. Right padding is safe in both: a
    pad only ever comes after the positions that are read."""
    lengths = [len(c) for c in contexts]
    n_ctx = max(lengths)
    batch = torch.zeros(len(contexts), n_ctx, dtype=torch.long)
    for g, ctx in enumerate(contexts):
        batch[g, : len(ctx)] = torch.tensor(ctx)
    prefix = KVCache(model.cfg, len(contexts), n_ctx, device=device, dtype=model.dtype)
    hidden = model(batch.to(device), cache=prefix, hidden=True)  # (G, n_ctx, C)
    rows = [(g, cont) for g, group in enumerate(conts) for cont in group]
    scores: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    order = sorted(range(len(rows)), key=lambda r: len(rows[r][1]))
    while order:  # the shortest continuations first, as many rows as fit the budget once padded
        take = 1
        while take < len(order) and (len(rows[order[take]][1]) - 1) * (take + 1) <= budget:
            take += 1
        picked, order = order[:take], order[take:]
        part = _score_rows(model, head, prefix, hidden, lengths, [rows[r] for r in picked], device)
        for r, score in zip(picked, part, strict=True):
            scores[r] = score
    out: list[list[tuple[float, bool]]] = [[] for _ in contexts]
    for (g, _), score in zip(rows, scores, strict=True):
        out[g].append(score)
    return out


def _score_rows(
    model: Transformer,
    head: nn.Module,
    prefix: KVCache,
    hidden: torch.Tensor,
    lengths: list[int],
    rows: list[tuple[int, list[int]]],
    device: torch.device,
) -> list[tuple[float, bool]]:
    """(log-likelihood, is_greedy) of each (context index, continuation) row after the contexts in prefix."""
    owner = torch.tensor([g for g, _ in rows], device=device)
    last = hidden[owner, torch.tensor([lengths[g] - 1 for g, _ in rows], device=device)]  # (R, C): each cont[0]
    n_ctx, n_cont = hidden.size(1), max(len(cont) for _, cont in rows)
    pieces = [last[:, None]]
    if n_cont > 1:
        cache = KVCache(model.cfg, len(rows), n_ctx + n_cont - 1, device=device, dtype=hidden.dtype)
        for dst, src in zip(cache.k + cache.v, prefix.k + prefix.v, strict=True):
            dst[:, :, :n_ctx] = src.index_select(0, owner)
        cache.pos = torch.tensor([lengths[g] for g, _ in rows], device=device)  # (R,): per-row positions
        tails = torch.zeros(len(rows), n_cont - 1, dtype=torch.long)
        for r, (_, cont) in enumerate(rows):
            tails[r, : len(cont) - 1] = torch.tensor(cont[:-1])
        pieces.append(model(tails.to(device), cache=cache, hidden=True))  # (R, n_cont - 1, C)
    states = torch.cat(pieces, dim=1)  # (R, n_cont, C): row r predicts its cont from position 0 on
    keep = torch.tensor([[t < len(cont) for t in range(n_cont)] for _, cont in rows], device=device)
    targets = torch.tensor([t for _, cont in rows for t in cont], device=device)
    logp = F.log_softmax(head(states[keep]).float(), dim=-1)  # (N, V), only at scored positions
    token_ll = logp.gather(-1, targets[:, None])[:, 0]
    hit = logp.argmax(-1) == targets
    out, start = [], 0
    for _, cont in rows:
        end = start + len(cont)
        out.append((token_ll[start:end].sum().item(), bool(hit[start:end].all())))
        start = end
    return out


def rolling_windows(n: int, window: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Windows (start, end, scored) over a sequence of n tokens that predict each of positions 1..n-1 once.

    The model reads seq[start:end] and the last `scored` predictions count. The first window predicts everything
    it sees; each next one moves by at most `stride` and keeps up to window - stride tokens of context. With
    stride == window this is exactly lm-evaluation-harness's `loglikelihood_rolling` (its context_len is
    window - stride + 1)."""
    if not 0 < stride <= window:
        raise ValueError(f"stride must be in 1..window ({window}), got {stride}")
    first = min(window, n - 1)
    if first <= 0:
        return
    yield 0, first, first
    predicted = first
    while predicted < n - 1:
        step = min(n - 1 - predicted, stride)
        end = predicted + step
        yield end - window, end, step
        predicted = end


@torch.no_grad()
def rolling_nll(
    model: Transformer,
    read: Callable[[int, int], Sequence[int]],
    n: int,
    window: int,
    stride: int,
    batch_size: int = 4,
) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and count of positions 1..n-1 of a sequence read(start, end)."""
    device = model.device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    spans = list(rolling_windows(n, window, stride))
    head = model.lm_head  # applied only where a token is scored
    for b in range(0, len(spans), batch_size):
        chunk = spans[b : b + batch_size]
        longest = max(end - start for start, end, _ in chunk)
        inputs = torch.zeros(len(chunk), longest, dtype=torch.long, device=device)
        targets = []
        for r, (start, end, scored) in enumerate(chunk):
            seq = torch.as_tensor(read(start, end + 1), dtype=torch.long)
            inputs[r, : end - start] = seq[:-1]
            targets.append(seq[-scored:])
        hidden = model(inputs, hidden=True)  # (B, T, C)
        for r, (start, end, scored) in enumerate(chunk):
            rows = hidden[r, end - start - scored : end - start]
            logits = head(rows).float()
            total += F.cross_entropy(logits, targets[r].to(device), reduction="sum").item()
            count += scored
    model.train(was_training)
    return total, count


def document_nll(
    model: Transformer, tokens: Sequence[int], prefix_id: int, window: int, stride: int, batch_size: int = 4
) -> tuple[float, int]:
    """rolling_nll of a document's tokens, the first predicted from prefix_id (end-of-text, as the harness does)."""
    seq = [prefix_id, *tokens]
    return rolling_nll(model, lambda a, b: seq[a:b], len(seq), window, stride, batch_size)
