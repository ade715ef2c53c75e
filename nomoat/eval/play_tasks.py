"""Chat tasks made from a play's own text: who says a line, who speaks first, who speaks last.

A play (speeches as `NAME:` then lines, blank lines between, as the bundled Shakespeare) yields passages of a
few consecutive speeches, each cut to its first line. Each task asks a question about one passage; the answer is
in the passage, so a model must learn to read it rather than to remember the play. The same definitions make
the supervised conversations, the preference pairs (the rejected answer is a plausible wrong one: another
speaker of the same passage) and the held-out items, and score a model: greedy answer, exact match; two models
scored on the same items are compared with a paired test (paired_change). So a chat model can be taught and
measured from public-domain text alone, with nothing downloaded.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nomoat.chat import stream_reply
from nomoat.errors import UserError
from nomoat.generate import generate_tokens
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer

SPEECH = re.compile(r"^([A-Z][A-Za-z' ]{1,30}):\n(.+)", re.DOTALL)
TASKS = ("who_says", "first_speaker", "last_speaker")
PASSAGE_SPEECHES = 3
LINE_CHARS = 48  # a speech's first line, cut at a word boundary: passages stay short enough for a small context


@dataclass(frozen=True)
class Item:
    """One question about one passage: the prompt, its right answer and a plausible wrong one."""

    task: str
    passage: str
    question: str
    answer: str
    wrong: str

    @property
    def prompt(self) -> str:
        return f"{self.passage}\n\n{self.question}"

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.answer}]

    def preference(self) -> dict[str, Any]:
        """TRL's conversational preference record."""
        return {
            "prompt": [{"role": "user", "content": self.prompt}],
            "chosen": [{"role": "assistant", "content": self.answer}],
            "rejected": [{"role": "assistant", "content": self.wrong}],
        }


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, first line) of every speech, the line cut to LINE_CHARS at a word boundary."""
    out = []
    for block in text.split("\n\n"):
        m = SPEECH.match(block.strip())
        if not m:
            continue
        line = m.group(2).split("\n")[0].strip()
        if len(line) > LINE_CHARS:
            line = line[:LINE_CHARS].rsplit(" ", 1)[0].rstrip(",;:")
        if line:
            out.append((m.group(1).strip(), line))
    return out


Made = tuple[str, str, list[str]]  # question, answer, the passage's other speakers (wrong answers it offers)


def _who_says(speech: Sequence[tuple[str, str]], rng: random.Random) -> Made | None:
    names = {n for n, _ in speech}
    lines = [ln for _, ln in speech]
    picks = [i for i, (n, ln) in enumerate(speech) if lines.count(ln) == 1 and len(names - {n}) > 0]
    if not picks:
        return None
    name, line = speech[rng.choice(picks)]
    return f'Who says "{line}"?', name, sorted(names - {name})


def _first_speaker(speech: Sequence[tuple[str, str]], rng: random.Random) -> Made | None:
    others = sorted({n for n, _ in speech[1:]} - {speech[0][0]})
    return ("Who speaks first?", speech[0][0], others) if others else None


def _last_speaker(speech: Sequence[tuple[str, str]], rng: random.Random) -> Made | None:
    others = sorted({n for n, _ in speech[:-1]} - {speech[-1][0]})
    return ("Who speaks last?", speech[-1][0], others) if others else None


MAKERS: dict[str, Callable[[Sequence[tuple[str, str]], random.Random], Made | None]] = {
    "who_says": _who_says,
    "first_speaker": _first_speaker,
    "last_speaker": _last_speaker,
}


def look_alike(answer: str, cast: Sequence[str], exclude: set[str]) -> str | None:
    """The cast name (cast sorted) that starts most like the answer: the mistake of a model that copies the first
    piece of a name and then writes one it remembers (ANTONIO -> ANTIGONUS). In sorted order the names sharing
    the longest prefix with the answer sit next to where it would go, so only the nearest few are looked at."""
    at = bisect.bisect_left(cast, answer)
    near = [n for n in cast[max(0, at - 4) : at + 4] if n not in exclude and n != answer]
    best = max(near, key=lambda n: len(os.path.commonprefix([answer, n])), default=None)
    return best if best and os.path.commonprefix([answer, best]) else None


def wrong_answer(made: Made, cast: Sequence[str], passage_names: set[str], rng: random.Random) -> str:
    """A plausible wrong answer: another speaker of the passage, or half of the time a look-alike name."""
    if rng.random() < 0.5 and (alike := look_alike(made[1], cast, passage_names)):
        return alike
    return rng.choice(made[2])


def make_items(
    text: str,
    n: int,
    seed: int,
    tasks: Sequence[str] = TASKS,
    stride: int = PASSAGE_SPEECHES,
    rename: int = 0,
) -> list[Item]:
    """Up to n items, tasks in turn, from passages of `text` in a seeded random order; passages start every
    `stride` speeches (1 overlaps them: more training items from the same text). `rename` > 0 uses each passage
    that many times, its speakers renamed each time with names drawn from the whole cast, so that an answer
    cannot be guessed from which play a passage is from: a model trained on such items must read the passage,
    and so can answer on plays it never saw."""
    if unknown := [t for t in tasks if t not in MAKERS]:
        raise UserError(f"unknown play task {unknown[0]!r} (known: {', '.join(MAKERS)})")
    found = speeches(text)
    if len(found) < PASSAGE_SPEECHES:
        raise UserError("the text has too few speeches ('NAME:' then a line) to make play tasks from")
    rng = random.Random(seed)
    cast = sorted({name for name, _ in found})
    starts = list(range(0, len(found) - PASSAGE_SPEECHES + 1, stride)) * max(1, rename)
    rng.shuffle(starts)
    items: list[Item] = []
    for k, start in enumerate(starts):
        if len(items) >= n:
            break
        speech = found[start : start + PASSAGE_SPEECHES]
        if rename:
            names = sorted({name for name, _ in speech})
            new = dict(zip(names, rng.sample(cast, len(names)), strict=True))
            speech = [(new[name], line) for name, line in speech]
        made = MAKERS[tasks[k % len(tasks)]](speech, rng)
        if made is not None:
            passage = "\n\n".join(f"{name}:\n{line}" for name, line in speech)
            wrong = wrong_answer(made, cast, {name for name, _ in speech}, rng)
            items.append(Item(tasks[k % len(tasks)], passage, made[0], made[1], wrong))
    return items


def few_shot_prompt(shots: Sequence[Item], item: Item) -> str:
    """A base model's prompt in the play's own layout: each worked example is a passage whose last speech asks
    the question and whose answer is the next speaker's name, `NAME:`, as a play names whoever speaks next."""
    blocks = [f"{s.prompt}\n\n{s.answer}:\n\n" for s in shots]
    return "".join(blocks) + f"{item.prompt}\n\n"


def _same(reply: str, answer: str) -> bool:
    return " ".join(reply.split()).lower() == " ".join(answer.split()).lower()


@torch.no_grad()
def answer(model: Transformer, tokenizer: Tokenizer, item: Item, shots: Sequence[Item] = ()) -> str:
    """The model's greedy answer: through its chat template (as `nomoat chat`), or few-shot for a base model."""
    if not shots:
        return "".join(stream_reply(model, tokenizer, item.conversation()[:1], max_new_tokens=32, temperature=0.0))
    budget = model.cfg.max_seq_len - 32
    ids = tokenizer.encode(few_shot_prompt(shots, item))
    while len(ids) > budget and shots:  # as many examples as the context holds
        shots = shots[1:]
        ids = tokenizer.encode(few_shot_prompt(shots, item))
    if len(ids) > budget:
        ids = ids[-budget:]
    out: list[int] = []
    for t in generate_tokens(model, ids, 32, temperature=0.0, eos_id=tokenizer.eos_id):
        out.append(t)
        if any(c in tokenizer.decode(out) for c in ":\n"):
            break
    return re.split(r"[:\n]", tokenizer.decode(out))[0].strip()


def score(
    model: Transformer, tokenizer: Tokenizer, items: Sequence[Item], shots: Sequence[Item] = ()
) -> dict[str, Any]:
    """Exact-match accuracy per task and overall, and every (item, reply) for the report's samples."""
    replies = [answer(model, tokenizer, it, shots) for it in items]
    correct = [_same(reply, it.answer) for it, reply in zip(items, replies, strict=True)]
    per_task: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct, strict=True):
        per_task.setdefault(it.task, []).append(ok)
    return {
        "accuracy": sum(correct) / max(1, len(correct)),
        "tasks": {t: sum(oks) / len(oks) for t, oks in per_task.items()},
        "replies": replies,
        "correct": correct,
    }


def paired_change(before: Sequence[bool], after: Sequence[bool]) -> dict[str, Any]:
    """Whether a change in accuracy on the same items is more than chance: the items one model gets right and
    the other wrong, and the exact McNemar test's two-sided p-value (a binomial test on those items alone), so a
    report can say that a stage measurably improved the model rather than print two close numbers."""
    if len(before) != len(after):
        raise ValueError(f"paired_change: {len(before)} items before, {len(after)} after")
    gained = sum(1 for b, a in zip(before, after, strict=True) if a and not b)
    lost = sum(1 for b, a in zip(before, after, strict=True) if b and not a)
    n = gained + lost
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2**n if n else 1.0
    return {
        "change": (gained - lost) / max(1, len(before)),
        "gained": gained,
        "lost": lost,
        "p_value": min(1.0, 2 * tail),
    }


def read_items(path: str | Path) -> list[Item]:
    """Items as the corpus stage saves them, one JSON object per line."""
    with open(path, encoding="utf-8") as f:
        return [Item(**json.loads(line)) for line in f]


def change_line(change: dict[str, Any], counts: bool = True) -> str:
    """`+3.1 points vs sft (61 items gained, 33 lost; McNemar p = 0.0045)`, or without the counts
    `+3.1 points vs sft (p = 0.0045)` (a table cell): a paired_change, with the "stage" it is measured against."""
    detail = f"{change['gained']} items gained, {change['lost']} lost; McNemar p" if counts else "p"
    return f"{100 * change['change']:+.1f} points vs {change['stage']} ({detail} = {change['p_value']:.2g})"
