"""Preference tuning: DPO (arXiv:2305.18290) and IPO (arXiv:2310.12036) as a loss for the one training loop.

Here: preference records in TRL's format turned into (prompt, chosen, rejected) token ids exactly as TRL's
DPOTrainer tokenizes them, the batch that puts chosen and rejected rows through one forward pass, the losses with
TRL's metric names, and the reference model's log-probs: LoRA switched off, a frozen copy, or a table computed
once up front. Not here: the loop (train.py), wiring a run and its loader (finetune.py), switching adapters off
(lora.py).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nomoat.chat import check_roles, render_chat
from nomoat.errors import UserError
from nomoat.lora import adapters_disabled, lora_layers
from nomoat.tokenizer import Tokenizer

IGNORE = -100  # a target that is not scored: prompt tokens and padding
# (prompt ids, chosen completion ids, rejected completion ids), and with a precomputed reference its log-probs
# (chosen, rejected) as a 4th item
Pair = tuple[Any, ...]
KEYS = ("prompt", "chosen", "rejected")


def extract_prompt(record: dict[str, Any]) -> dict[str, Any]:
    """A record without "prompt" split as TRL's extract_prompt does: the prompt is what chosen and rejected
    share from the start (whole messages of conversations, characters of strings, a space left to the reply)."""
    chosen, rejected = record["chosen"], record["rejected"]
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # TRL's loop, quirks kept: a pair that only differs in
        if chosen[idx] != rejected[idx]:  # length leaves its last shared item to the completions
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return {"prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _encode_texts(tokenizer: Tokenizer, record: dict[str, Any]) -> tuple[list[int], list[int], list[int]]:
    """Token ids of the prompt alone and of prompt + chosen, prompt + rejected, as TRL tokenizes them: strings
    with the eos token appended to each completion, conversations rendered through the chat template."""
    prompt, chosen, rejected = (record[k] for k in KEYS)
    if isinstance(prompt, str):
        eos = tokenizer.eos_token
        if eos is None:
            raise UserError("the tokenizer has no eos token to end a completion with")
        chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
        return tokenizer.encode(prompt), tokenizer.encode(prompt + chosen), tokenizer.encode(prompt + rejected)
    if tokenizer.chat_template is None:
        raise UserError("conversational records need the model's chat template, and its tokenizer has none")
    for messages in (prompt, chosen, rejected):
        check_roles(messages)
    return (
        tokenizer.encode(render_chat(tokenizer, prompt, add_generation_prompt=True)),
        tokenizer.encode(render_chat(tokenizer, prompt + chosen, add_generation_prompt=False)),
        tokenizer.encode(render_chat(tokenizer, prompt + rejected, add_generation_prompt=False)),
    )


def _check_record(record: Any) -> dict[str, Any]:
    """The record with its prompt made explicit, or an error naming what is wrong with it."""
    if not isinstance(record, dict):
        raise UserError(f"expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        keys = ", ".join(sorted(record)) or "none"
        raise UserError(f"a preference record needs 'prompt', 'chosen' and 'rejected' (no {missing[0]!r}; has: {keys})")
    if "prompt" not in record:
        if not (isinstance(record["chosen"], list) and isinstance(record["rejected"], list)):
            raise UserError("a preference record needs 'prompt' (only conversations may leave it implicit)")
        record = extract_prompt(record)
    kinds = {type(record[k]) for k in KEYS}
    if kinds not in ({str}, {list}):
        raise UserError("'prompt', 'chosen' and 'rejected' must all be strings or all be lists of messages")
    if record["chosen"] == record["rejected"]:
        raise UserError("'chosen' and 'rejected' are identical: the pair prefers nothing")
    return record


def encode_pair(tokenizer: Tokenizer, record: Any, where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of one record; the completions start where the tokenized prompt and
    prompt + completion part (TRL's rule), which is after the prompt unless tokens merge across the join."""
    try:
        record = _check_record(record)
        prompt, chosen, rejected = _encode_texts(tokenizer, record)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    n = min(_common_prefix(prompt, chosen), _common_prefix(prompt, rejected))
    if n == 0:
        raise UserError(f"{where}: the prompt is empty: a completion's first token would have nothing before it")
    if len(chosen) == n or len(rejected) == n:
        raise UserError(f"{where}: {'chosen' if len(chosen) == n else 'rejected'} adds no token to the prompt")
    return prompt[:n], chosen[n:], rejected[n:]


@dataclass
class PairStats:
    """What happened to each record: nothing is dropped without being counted here."""

    records: int = 0
    pairs: int = 0
    tokens: int = 0  # prompt + chosen + rejected tokens kept
    truncated: int = 0
    dropped_overlong: int = 0

    def line(self) -> str:
        return (
            f"{self.records:,} records -> {self.pairs:,} preference pairs, {self.tokens:,} tokens; "
            f"{self.truncated} truncated, {self.dropped_overlong} dropped as over-long"
        )


def read_pairs(
    tokenizer: Tokenizer, records: Iterable[tuple[str, Any]], seq_len: int, overlong: str = "truncate"
) -> tuple[list[Pair], PairStats]:
    """Every (where, record) as a pair whose prompt + completion sequences fit seq_len inputs (seq_len + 1 tokens):
    longer ones keep their start (TRL's keep_start) or are dropped; a prompt that fills them all is dropped."""
    stats = PairStats()
    pairs: list[Pair] = []
    room = seq_len + 1
    for where, record in records:
        stats.records += 1
        prompt, chosen, rejected = encode_pair(tokenizer, record, where)
        if len(prompt) + max(len(chosen), len(rejected)) > room:
            if overlong == "drop" or len(prompt) >= room:
                stats.dropped_overlong += 1
                continue
            stats.truncated += 1
            chosen, rejected = chosen[: room - len(prompt)], rejected[: room - len(prompt)]
        pairs.append((prompt, chosen, rejected))
        stats.tokens += len(prompt) + len(chosen) + len(rejected)
    if not pairs:
        raise UserError(f"no preference pair fits train.seq_len {seq_len} ({stats.line()})")
    stats.pairs = len(pairs)
    return pairs, stats


def collate_pairs(pairs: list[Pair], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(x, y) of shape (2B, T): rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected, one batch for one
    forward pass (as TRL concatenates them); y scores completion tokens only. With precomputed reference log-probs
    a third tensor (B, 2) holds them."""
    seqs = [(p, p + c) for p, c, *_ in pairs] + [(p, p + r) for p, _, r, *_ in pairs]
    T = max(len(s) for _, s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, (prompt, seq) in enumerate(seqs):
        x[i, : len(seq) - 1] = torch.tensor(seq[:-1])
        y[i, len(prompt) - 1 : len(seq) - 1] = torch.tensor(seq[len(prompt) :])  # token t predicted at t - 1
    if len(pairs[0]) == 4:
        return x, y, torch.tensor([p[3] for p in pairs], dtype=torch.float32)
    return x, y


def sequence_logps(
    forward: Callable[..., torch.Tensor], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of (x, y): the summed log-probability of its scored targets, and how many there are, both (R,).

    The output head runs only on the scored positions (inside the forward, as `head`, so that DDP and FSDP see
    one call): no (R, T, V) logits are ever held, as TRL's fused head avoids them too."""
    scored = y != IGNORE  # (R, T)

    def head(h: torch.Tensor) -> torch.Tensor:  # (R, T, C) -> (N,) log-probs of the N scored targets
        logits = model.lm_head(model.norm(h[scored])).float()  # (N, V)
        return -F.cross_entropy(logits, y[scored], reduction="none")

    token_logps = forward(x, head=head)
    rows = scored.nonzero()[:, 0]
    logps = torch.zeros(len(x), device=x.device, dtype=token_logps.dtype).index_add(0, rows, token_logps)
    return logps, scored.sum(1)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the reference, which must be a fixed function of its input."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@torch.no_grad()
def reference_logps(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed log-probs (R,) of the rows of (x, y) under the model as its base: LoRA adapters off (PEFT's
    disable_adapter, as TRL's reference for a new adapter), dropout off."""
    with adapters_disabled(model), _eval_mode(model):
        return sequence_logps(model, model, x, y)[0]


class DPOLoss:
    """The preference loss of a batch from collate_pairs, as train.Setup.loss: (loss, metrics), the metrics named
    as TRL logs them. The reference is a frozen model (ref_model), the policy with its LoRA adapters off, or the
    log-probs that batches carry (precomputed)."""

    def __init__(
        self,
        model: torch.nn.Module,
        beta: float = 0.1,
        kind: Literal["sigmoid", "ipo"] = "sigmoid",
        label_smoothing: float = 0.0,
        ref_model: torch.nn.Module | None = None,
        precomputed: bool = False,
        sft_weight: float = 0.0,
    ) -> None:
        if not precomputed and ref_model is None and not lora_layers(model):
            raise UserError("DPO on full weights needs a reference: a frozen copy or precomputed log-probs")
        self.model, self.beta, self.kind, self.label_smoothing = model, beta, kind, label_smoothing
        self.ref_model, self.precomputed, self.sft_weight = ref_model, precomputed, sft_weight

    def __call__(
        self, forward: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, *precomputed = batch
        policy, counts = sequence_logps(forward, self.model, x, y)  # (2B,): chosen rows, then rejected rows
        if self.precomputed:
            ref = precomputed[0].t().flatten()  # (B, 2) -> (2B,)
        else:
            ref = reference_logps(self.model if self.ref_model is None else self.ref_model, x, y)
        return self.loss(policy, ref.to(policy.dtype), counts)

    def loss(
        self, policy: torch.Tensor, ref: torch.Tensor, counts: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over the pairs from summed log-probs (2B,) of policy and reference, and token counts (2B,)."""
        policy_chosen, policy_rejected = policy.chunk(2)
        chosen_ratio, rejected_ratio = (policy - ref).chunk(2)
        if self.kind == "sigmoid":  # label smoothing: the conservative DPO of TRL before 1.0
            logits = self.beta * (chosen_ratio - rejected_ratio)
            ls = self.label_smoothing
            losses = -F.logsigmoid(logits) * (1 - ls) - F.logsigmoid(-logits) * ls
        else:  # IPO's squared loss on per-token averages, as TRL (and IPO's authors) normalise it
            chosen_n, rejected_n = counts.chunk(2)
            delta = chosen_ratio / chosen_n.clamp(min=1) - rejected_ratio / rejected_n.clamp(min=1)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        chosen, rejected = self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
        metrics = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        loss = losses.mean()
        if self.sft_weight:  # TRL's "sft" loss: the mean next-token loss over every chosen token of the batch
            nll = -policy_chosen.sum() / counts.chunk(2)[0].sum().clamp(min=1)
            metrics["nll_loss"] = nll.detach()
            loss = loss + self.sft_weight * nll
        return loss, metrics

    @torch.no_grad()
    def evaluate(
        self,
        forward: Callable[..., torch.Tensor],
        pairs: list[Pair],
        pad_id: int,
        batch_size: int,
        device: Any,
        progress: bool = False,
    ) -> dict[str, float]:
        """The loss and metrics over held-out pairs, each pair weighing the same: val_loss, val_rewards/...; with
        progress, a bar of batches on stderr."""
        totals: dict[str, float] = {}
        starts = range(0, len(pairs), batch_size)
        for i in tqdm(starts, desc="validation", unit="batch", leave=False, disable=not progress):
            chunk = pairs[i : i + batch_size]
            batch = tuple(t.to(device) for t in collate_pairs(chunk, pad_id))
            loss, metrics = self(forward, batch)
            for name, value in {"loss": loss, **metrics}.items():
                totals[name] = totals.get(name, 0.0) + value.item() * len(chunk)
        return {f"val_{name}": total / len(pairs) for name, total in totals.items()}


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The reference for full fine-tuning: the weights as they are now, kept out of training."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def precompute_reference(
    model: torch.nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, device: Any
) -> torch.Tensor:
    """Reference log-probs (N, 2) of every pair (chosen, rejected) under the model as its base (before training),
    computed once, in order: afterwards no reference model is kept."""
    out = []
    for i in range(0, len(pairs), batch_size):
        x, y = (t.to(device) for t in collate_pairs(pairs[i : i + batch_size], pad_id)[:2])
        out.append(reference_logps(model, x, y).float().cpu().view(2, -1).t())  # (2b,) -> (b, 2)
    return torch.cat(out)


def with_reference(pairs: list[Pair], ref: torch.Tensor) -> list[Pair]:
    """The pairs carrying their reference log-probs, which collate_pairs then batches with them."""
    return [(p, c, r, (float(rc), float(rr))) for (p, c, r, *_), (rc, rr) in zip(pairs, ref.tolist(), strict=True)]


def chosen_rows(pairs: list[Pair]) -> list[tuple[list[int], list[int]]]:
    """Each pair's prompt + chosen completion as a fine-tuning row (inputs, targets scored on the completion):
    what `merge` measures bits per byte on."""
    rows = []
    for prompt, chosen, *_ in pairs:
        seq = prompt + chosen
        rows.append((seq[:-1], [IGNORE] * (len(prompt) - 1) + chosen))
    return rows
