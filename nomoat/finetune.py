"""Fine-tuning: instruction, chat and plain-text records -> masked batches -> the one training loop.

Here: fine-tuning records (read by files.read_records) encoded with assistant-only loss masks (chat.py),
over-long and unscored samples counted, optional packing, a loader whose batch k is a pure function of
(seed, k), the `finetune()` call that hands train() a Setup (full weights, LoRA, or LoRA over an NF4 base), and
`merge`. Not here: the loop itself (train.py), loading a tuned model back (load.py), LoRA and NF4 (lora.py,
quant.py).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from nomoat.chat import encode_chat
from nomoat.checkpoint import Checkpoint, list_checkpoints, write_files
from nomoat.config import FinetuneConfig, RunConfig, absolute_paths
from nomoat.convert.hf import copy_side_files
from nomoat.data.datasheet import source_of
from nomoat.device import pick_device
from nomoat.dpo import (
    DPOLoss,
    Pair,
    PairStats,
    chosen_rows,
    collate_pairs,
    frozen_copy,
    precompute_reference,
    read_pairs,
    with_reference,
)  # fmt: skip
from nomoat.errors import UserError
from nomoat.files import atomic_folder, file_sha256, read_records
from nomoat.load import apply_adapter, load_model, model_folder, tuned_config
from nomoat.lora import ADAPTER_CONFIG, add_lora, merge_lora, save_adapter
from nomoat.quant import dequantize_model, quantize_model
from nomoat.tokenizer import Tokenizer
from nomoat.train import Setup, TrainResult, check_run_folder, train

IGNORE = -100  # target id that cross_entropy skips: prompt tokens and padding
# (inputs, targets) of one training row, targets IGNORE where not scored; packed rows add each token's sample id
Row = tuple[list[int], ...]


def read_data(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of a fine-tuning file: JSON lines (`file:line`) or a JSON array (`file[i]`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    if path.suffix not in (".json", ".jsonl"):
        raise UserError(f"{path}: expected a .jsonl, .json or .txt file")
    return read_records(path)


def to_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """A chat record's messages, or an Alpaca record (instruction, optional input, output) as one exchange."""
    if "messages" in record:
        if not isinstance(record["messages"], list):
            raise UserError("'messages' must be a list of {'role': ..., 'content': ...}")
        return record["messages"]
    prompt = record["instruction"]
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    if tokenizer.eos_id is None:
        raise UserError("the tokenizer has no eos token to end a document with")
    return tokenizer.encode(text) + [tokenizer.eos_id]


def encode_record(tokenizer: Tokenizer, record: Any, where: str) -> list[tuple[list[int], list[bool]]]:
    """Token ids and loss mask of one record; errors are prefixed with where."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    try:
        if "messages" in record or ("instruction" in record and "output" in record):
            return [encode_chat(tokenizer, to_messages(record))]
        if isinstance(record.get("text"), str):
            ids = encode_text(tokenizer, record["text"])
            return [(ids, [True] * len(ids))]
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    keys = ", ".join(sorted(record)) or "none"
    raise UserError(f"{where}: a record needs 'messages', 'instruction' and 'output', or 'text' (it has: {keys})")


@dataclass
class DataStats:
    """What happened to each record: nothing is dropped without being counted here."""

    records: int = 0
    rows: int = 0
    tokens: int = 0
    scored: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_unscored: int = 0  # no scored target left, e.g. a reply entirely cut off by truncation

    def line(self) -> str:
        return (
            f"{self.records:,} records -> {self.rows:,} rows, {self.tokens:,} tokens ({self.scored:,} scored); "
            f"{self.truncated} truncated, {self.dropped_overlong} dropped as over-long, "
            f"{self.dropped_unscored} dropped with nothing to learn"
        )


def _row(ids: list[int], mask: list[bool]) -> Row:
    """Inputs and shifted targets: token t is scored as the prediction made at position t - 1."""
    return ids[:-1], [t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)]


def build_rows(
    tokenizer: Tokenizer, path: str | Path, seq_len: int, overlong: str = "truncate", packing: bool = False
) -> tuple[list[Row], DataStats]:
    """Every record of a data file as rows of at most seq_len inputs; packed several to a row if asked."""
    stats = DataStats()
    pieces: list[tuple[list[int], list[bool]]] = []
    if Path(path).suffix == ".txt":  # plain text: one document, cut into windows that overlap by one token
        stats.records = 1
        ids = encode_text(tokenizer, Path(path).read_text())
        windows = [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
        pieces = [(w, [True] * len(w)) for w in windows]
    else:
        for where, record in read_data(path):
            stats.records += 1
            for ids, mask in encode_record(tokenizer, record, where):
                if len(ids) <= seq_len + 1:
                    pieces.append((ids, mask))
                elif overlong == "truncate":
                    stats.truncated += 1
                    pieces.append((ids[: seq_len + 1], mask[: seq_len + 1]))
                else:
                    stats.dropped_overlong += 1
    rows: list[Row] = []
    for ids, mask in pieces:
        if len(ids) < 2 or not any(mask[1:]):
            stats.dropped_unscored += 1
        else:
            rows.append(_row(ids, mask))
    if not rows:
        raise UserError(f"{path}: no sample has a token to learn from ({stats.line()})")
    if packing:
        rows = pack(rows, seq_len)
    stats.rows = len(rows)
    stats.tokens = sum(len(r[0]) for r in rows)
    stats.scored = sum(sum(t != IGNORE for t in r[1]) for r in rows)
    return rows, stats


def pack(rows: list[Row], seq_len: int) -> list[Row]:
    """First-fit decreasing: whole samples into rows of seq_len, never split. Each token carries its sample's id,
    so the model attends only within a sample and restarts its positions (Transformer.forward's segments):
    a packed row computes exactly what its samples would alone."""
    bins: list[Row] = []
    space: list[int] = []
    for x, y, *_ in sorted(rows, key=lambda r: -len(r[0])):
        # look at the newest bins only: first fit over all of them is quadratic in the number of samples
        first = max(0, len(bins) - 64)
        i = next((j for j in range(first, len(bins)) if space[j] >= len(x)), None)
        if i is None:
            bins.append(([], [], []))
            space.append(seq_len)
            i = len(bins) - 1
        sample = bins[i][2][-1] + 1 if bins[i][2] else 0
        bins[i][0].extend(x)
        bins[i][1].extend(y)
        bins[i][2].extend([sample] * len(x))
        space[i] -= len(x)
    return bins


class RowLoader:
    """Batches of rows padded to the longest; batch k depends only on (seed, k): rows are visited in a fresh
    permutation each epoch, so resuming needs only the step. A batch with no scored target is an error.
    `collate` makes a batch of other kinds of rows (dpo.collate_pairs)."""

    def __init__(
        self,
        rows: list[Any],
        batch_size: int,
        seed: int,
        pad_id: int,
        collate: Callable[[list[Any], int], tuple[torch.Tensor, ...]] | None = None,
    ) -> None:
        self.rows, self.batch_size, self.seed, self.pad_id = rows, batch_size, seed, pad_id
        self.collate = collate or pad_batch
        self.step = 0
        self._order: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))  # (epoch, its permutation)

    def __iter__(self) -> RowLoader:
        return self

    def _index(self, k: int) -> int:
        epoch, i = divmod(k, len(self.rows))
        if self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)))
        return int(self._order[1][i])

    def __next__(self) -> tuple[torch.Tensor, ...]:
        first = self.step * self.batch_size
        picked = [self.rows[self._index(k)] for k in range(first, first + self.batch_size)]
        self.step += 1
        return self.collate(picked, self.pad_id)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "step": self.step, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["rows"] != len(self.rows):
            raise UserError(
                f"data loader state has seed {state['seed']} and {state['rows']} rows; this run has seed "
                f"{self.seed} and {len(self.rows)} rows (did the data file change?)"
            )
        self.step = int(state["step"])


def pad_batch(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(x, y) of shape (B, T) for T the longest row, plus the sample ids of packed rows; padding is never scored
    and forms a sample of its own."""
    T = max(len(r[0]) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    packed = len(rows[0]) == 3
    segments = torch.full((len(rows), T), len(rows[0][0]) + 1, dtype=torch.long) if packed else None
    for i, (xs, ys, *rest) in enumerate(rows):
        x[i, : len(xs)] = torch.tensor(xs)
        y[i, : len(ys)] = torch.tensor(ys)
        if segments is not None:
            segments[i, : len(xs)] = torch.tensor(rest[0])
    if (y == IGNORE).all():
        raise UserError("a batch has no scored token (its loss mask is all zero): nothing would be learned")
    return (x, y) if segments is None else (x, y, segments)


def scored_bytes(tokenizer: Tokenizer, row: Row) -> int:
    """UTF-8 bytes of a row's scored targets, decoded run by run: the denominator of bits per byte."""
    total, run = 0, []
    for t in [*row[1], IGNORE]:
        if t != IGNORE:
            run.append(t)
        elif run:
            total += len(tokenizer.decode(run).encode())
            run = []
    return total


@torch.no_grad()
def masked_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    tokenizer: Tokenizer,
    rows: list[Row],
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, float]:
    """Mean loss over scored tokens, and bits per byte of their text; with progress, a bar of batches on stderr."""
    nats, tokens, nbytes = 0.0, 0, 0
    starts = range(0, len(rows), batch_size)
    for i in tqdm(starts, desc="validation", unit="batch", leave=False, disable=not progress):
        x, y, *segments = pad_batch(rows[i : i + batch_size], tokenizer.eos_id or 0)
        logits = forward(x.to(device), segments=segments[0].to(device) if segments else None).float()
        nats += F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        tokens += int((y != IGNORE).sum())
        nbytes += sum(scored_bytes(tokenizer, r) for r in rows[i : i + batch_size])
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / max(1, nbytes)}


def prepare_model(ckpt: Checkpoint, fc: FinetuneConfig, seed: int) -> torch.nn.Module:
    """The base model made ready for its method: all weights trainable, or frozen under LoRA (over NF4)."""
    model = ckpt.model.float()
    if fc.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if fc.method == "qlora":
        quantize_model(model, fc.double_quant)
    torch.manual_seed(seed)  # LoRA's A matrices: the same on a resumed run
    add_lora(model, fc.lora_rank, fc.lora_alpha, fc.lora_dropout, fc.targets)
    return model


def finetune(cfg: RunConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune cfg.finetune.base on cfg.finetune.data through train(); returns train()'s TrainResult.

    LoRA checkpoints hold a PEFT adapter folder (adapter_config.json, adapter_model.safetensors); full
    fine-tuning checkpoints hold the whole model. Every checkpoint records its base for `nomoat info`."""
    if cfg.finetune is None or not cfg.finetune.base or not cfg.finetune.data:
        raise UserError("finetune.base and finetune.data must be set (nomoat finetune --base MODEL --data FILE)")
    cfg = absolute_paths(cfg)  # as checkpoints and the adapter's config record them: valid from anywhere
    fc = cfg.finetune
    check_run_folder(cfg.train.out_dir, resume)  # before the base loads, which can take minutes
    device = pick_device(cfg.train.device)
    base = load_model(fc.base, device=device)
    if cfg.train.seq_len > base.cfg.model.max_seq_len:
        raise UserError(
            f"train.seq_len ({cfg.train.seq_len}) exceeds the base model's context ({base.cfg.model.max_seq_len}); "
            "set --train.seq_len"
        )
    cfg = dataclasses.replace(cfg, model=base.cfg.model)
    tc = cfg.train
    tokenizer = base.tokenizer
    rows, val_rows, stats = read_training_data(tokenizer, fc, tc.seq_len)
    if progress:
        print(f"data: {stats.line()}", flush=True)
    model = prepare_model(base, fc, tc.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if progress:
        print(f"model: {fc.method}, {trainable:,} trainable parameters", flush=True)

    data = Path(fc.data)
    digest = file_sha256(data)
    source = source_of(data, digest) or {}  # a datasheet beside the file: its licence travels with the model
    origin = {"source": source["name"], "license": source["license"], "url": source["url"]} if source else {}
    manifest = {
        "inputs": [{"path": str(data), "sha256": digest, "tokens": stats.tokens, **origin}],
        "finetune": dataclasses.asdict(stats),
    }
    setup = Setup(
        model=model,
        loader=RowLoader(rows, tc.batch_size, tc.seed, tokenizer.eos_id or 0),
        tokenizer=tokenizer,
        manifest=manifest,
    )
    if val_rows and fc.objective == "sft":
        setup.val = lambda forward: masked_loss(forward, tokenizer, val_rows, device, tc.batch_size, progress)
    if fc.method != "full":  # checkpoints hold the adapter, not a copy of the base
        setup.export = lambda m, folder: save_adapter(m, folder, base=fc.base)
    # the base's side files, copied into every checkpoint; staged outside the run folder, which a refused run
    # (checkpoints there already, no --resume) must leave untouched
    with tempfile.TemporaryDirectory() as tmp:
        setup.extra_files = copy_side_files(Path(base.path), Path(tmp))
        if fc.objective == "dpo":
            use_dpo(setup, cfg, rows, val_rows, device, resume, Path(tmp), progress)
        return train(cfg, resume=resume, progress=progress, setup=setup)


def read_training_data(
    tokenizer: Tokenizer, fc: FinetuneConfig, seq_len: int
) -> tuple[list[Any], list[Any] | None, DataStats | PairStats]:
    """(rows, validation rows, stats) of fc.data and fc.val_data for the objective: masked rows for sft,
    preference pairs for dpo."""
    if fc.objective == "dpo":
        pairs, stats = read_pairs(tokenizer, read_data(fc.data), seq_len, fc.overlong)
        val = read_pairs(tokenizer, read_data(fc.val_data), seq_len, fc.overlong)[0] if fc.val_data else None
        return pairs, val, stats
    rows, data_stats = build_rows(tokenizer, fc.data, seq_len, fc.overlong, fc.packing)
    val_rows = build_rows(tokenizer, fc.val_data, seq_len, fc.overlong)[0] if fc.val_data else None
    return rows, val_rows, data_stats


REFERENCE_FILE = "dpo_reference_logps.safetensors"  # precomputed reference log-probs, kept in every checkpoint


def use_dpo(
    setup: Setup,
    cfg: RunConfig,
    pairs: list[Pair],
    val_pairs: list[Pair] | None,
    device: torch.device,
    resume: bool,
    staging: Path,
    progress: bool = True,
) -> None:
    """Make the setup train by DPO: batches of preference pairs and the preference loss against its reference.

    With finetune.precompute_ref the reference log-probs are computed once (the base: adapters off, or the full
    weights before training) and saved into every checkpoint, from which a resumed run reads them back: the same
    numbers on any machine, so resuming stays exact. Without it LoRA's reference is the base with the adapters
    off, full fine-tuning's a frozen copy of the weights."""
    fc, tc, model = cfg.finetune, cfg.train, setup.model
    assert fc is not None
    pad = setup.tokenizer.eos_id or 0
    keep_copy = fc.method == "full" and not fc.precompute_ref
    ref_model = frozen_copy(model) if keep_copy else None
    objective = DPOLoss(model, fc.beta, fc.dpo_loss, fc.label_smoothing, ref_model, fc.precompute_ref, fc.sft_weight)
    if fc.precompute_ref:
        ref = _stored_reference(Path(tc.out_dir), len(pairs)) if resume else None
        if ref is None:
            ref = precompute_reference(model, pairs, pad, tc.batch_size, device)
        if progress:
            print(f"dpo: reference log-probs of {len(pairs):,} pairs computed once, no reference model kept")
        pairs = with_reference(pairs, ref)
        save_file({"logps": ref.contiguous()}, str(staging / REFERENCE_FILE))
        setup.extra_files.append(staging / REFERENCE_FILE)
        if val_pairs:
            val_pairs = with_reference(val_pairs, precompute_reference(model, val_pairs, pad, tc.batch_size, device))
    setup.loader = RowLoader(pairs, tc.batch_size, tc.seed, pad, collate=collate_pairs)
    setup.loss = objective
    if val_pairs:
        held_out = val_pairs
        setup.val = lambda forward: objective.evaluate(forward, held_out, pad, tc.batch_size, device, progress)


def _stored_reference(run_dir: Path, pairs: int) -> torch.Tensor | None:
    """The precomputed reference log-probs in the newest checkpoint of a run being resumed, if there are any."""
    found = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if not found or not (found[-1] / REFERENCE_FILE).is_file():
        return None
    ref = load_file(str(found[-1] / REFERENCE_FILE))["logps"]
    if len(ref) != pairs:
        raise UserError(
            f"{found[-1] / REFERENCE_FILE}: reference log-probs of {len(ref)} pairs, this run has {pairs} "
            "(did the data file change?)"
        )
    return ref


def measure_rows(tokenizer: Tokenizer, data: str | Path, seq_len: int, objective: str = "sft") -> list[Row]:
    """Rows that bits per byte is measured on: the records, or for preference data each prompt + chosen."""
    if objective == "dpo":
        return chosen_rows(read_pairs(tokenizer, read_data(data), seq_len)[0])
    return build_rows(tokenizer, data, seq_len)[0]


def merge(
    path: str | Path,
    out: str | Path,
    base: str | Path | None = None,
    requantize: bool = False,
    data: str | Path | None = None,
    max_rows: int = 64,
) -> dict[str, Any]:
    """Write full weights with a LoRA adapter folded in, as a nomoat checkpoint folder at `out`.

    For a 4-bit base the merge dequantizes and adds the update in fp32; `requantize` snaps the merged weights
    back onto the NF4 grid (the precision a 4-bit deployment would use). Reports bits per byte on up to
    max_rows rows of `data` (default: the fine-tuning data) of the base alone ("before", as a user reads it),
    of the base with the adapter unmerged, and of the merged model, so that both what the fine-tune taught
    and a damaging merge show."""
    folder = model_folder(path)
    tuned = tuned_config(folder)
    fc = tuned.finetune if tuned else None
    if not (folder / ADAPTER_CONFIG).is_file():  # --base would not help: there is no adapter to fold in
        what = "a full fine-tune, already merged" if fc is not None else "a whole model, with nothing to merge"
        raise UserError(f"{folder}: not a LoRA adapter (no {ADAPTER_CONFIG}): {what}")
    base = base or (fc.base if fc else None)
    if base is None:
        raise UserError(f"{folder}: a bare adapter with no base model recorded; pass --base MODEL")
    ckpt = load_model(base)
    data = data or (fc.data if fc else None)
    rows = None
    if data:
        seq_len = min((tuned or ckpt.cfg).train.seq_len, ckpt.cfg.model.max_seq_len)
        rows = measure_rows(ckpt.tokenizer, data, seq_len, fc.objective if fc else "sft")[:max_rows]
    model = ckpt.model.float().eval()
    before = masked_loss(model, ckpt.tokenizer, rows)["val_bpb"] if rows else None
    model = apply_adapter(model, folder, fc).eval()
    unmerged = masked_loss(model, ckpt.tokenizer, rows)["val_bpb"] if rows else None
    merge_lora(model)
    dequantize_model(model)
    if requantize:
        quantize_model(model, fc.double_quant if fc else True)
        dequantize_model(model)
    after = masked_loss(model, ckpt.tokenizer, rows)["val_bpb"] if rows else None
    cfg = RunConfig(model=ckpt.cfg.model, train=ckpt.cfg.train, finetune=fc)
    _save_folder(Checkpoint(folder, cfg, model, ckpt.tokenizer, None), Path(base), Path(out))
    return {
        "out": str(out),
        "base": str(base),
        "requantized": requantize,
        "bpb_before": before,
        "bpb_adapter": unmerged,
        "bpb_after": after,
        "bpb_change": None if before is None or after is None else after - before,
    }


def _save_folder(ckpt: Checkpoint, base: Path, out: Path) -> None:
    """A plain checkpoint folder at out, with the base's side files and the adapter's manifest (the data it was
    tuned on, which `nomoat info` and the model card read), written beside it and renamed into place."""
    with atomic_folder(out) as tmp:
        write_files(tmp, ckpt.model, ckpt.cfg, ckpt.tokenizer)
        if base.is_dir():
            copy_side_files(base, tmp)
        if (ckpt.path / "manifest.json").is_file():
            shutil.copyfile(ckpt.path / "manifest.json", tmp / "manifest.json")
