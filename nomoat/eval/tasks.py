"""Zero- and few-shot tasks as data: a TOML task definition over a local JSONL file, scored as the harness does.

A definition names its `kind` and Jinja2 snippets over each JSON line (the harness's own template language and
`regex_replace` filter): `context` and `continuation` are templates, `choices` and `label` are expressions.

    multiple_choice  context + target_delimiter + each choice; acc = argmax log-likelihood, acc_norm = argmax of
                     log-likelihood / len(choice) in characters (HellaSwag, ARC, PIQA)
    partial          each choice ends its own context, the shared continuation is scored (Winogrande)
    loglikelihood    context + continuation; acc = the continuation is the greedy one (LAMBADA), perplexity

HellaSwag, ARC-Easy/Challenge, PIQA, Winogrande and LAMBADA ship in `builtin/`. No downloads: data files are given.
"""

from __future__ import annotations

import math
import random
import re
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nomoat.config import read_toml
from nomoat.errors import UserError
from nomoat.eval.lm import score_requests
from nomoat.files import read_records
from nomoat.model import Transformer
from nomoat.tokenizer import Tokenizer

BUILTIN_DIR = Path(__file__).parent / "builtin"
Overflow = Literal["truncate", "skip", "error"]


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    name: str
    kind: Literal["multiple_choice", "partial", "loglikelihood"]
    context: str = ""  # template: the prompt (multiple_choice, loglikelihood)
    choices: str = ""  # expression: a list of strings (continuations, or contexts for partial)
    continuation: str = ""  # template: the scored text (partial, loglikelihood)
    label: str = ""  # expression: the index of the right choice
    metrics: tuple[str, ...] = ("acc",)
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    data: str = ""  # default data file, relative to the definition

    def __post_init__(self) -> None:
        needs = {"multiple_choice": ("context", "choices", "label"), "partial": ("choices", "continuation", "label")}
        for field in needs.get(self.kind, ("context", "continuation")):
            if not getattr(self, field):
                raise UserError(f"task {self.name}: kind {self.kind!r} needs `{field}`")
        allowed = {"acc", "acc_norm"} if self.kind != "loglikelihood" else {"acc", "perplexity"}
        if unknown := set(self.metrics) - allowed:
            raise UserError(f"task {self.name}: metric {sorted(unknown)[0]!r} is not one of {sorted(allowed)}")


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.toml"))


def load_task(name_or_path: str) -> TaskSpec:
    """A built-in task by name, or a task definition TOML file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = BUILTIN_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UserError(f"task {name_or_path!r}: no such file or built-in task ({', '.join(builtin_tasks())})")
    raw = read_toml(path)
    hints = typing.get_type_hints(TaskSpec)
    if unknown := set(raw) - set(hints):
        raise UserError(f"{path}: unknown task field {sorted(unknown)[0]!r}; fields: {', '.join(hints)}")
    if "metrics" in raw:
        raw["metrics"] = tuple(raw["metrics"])
    if raw.get("data"):
        raw["data"] = str(path.parent / raw["data"])
    try:
        return TaskSpec(**raw)
    except TypeError as e:
        raise UserError(f"{path}: {e}") from None


def parse_task_arg(arg: str) -> tuple[TaskSpec, Path]:
    """`NAME_OR_TOML=DATA.jsonl`, or a definition whose `data` names its file."""
    name, _, data = arg.partition("=")
    spec = load_task(name)
    data = data or spec.data
    if not data:
        raise UserError(f"task {spec.name}: give its data file as {name}=FILE.jsonl")
    return spec, Path(data)


@dataclass(frozen=True)
class Item:
    """One rendered JSONL line: the requests to score as (context, continuation) strings."""

    line: int
    doc: dict[str, Any]
    requests: list[tuple[str, str]]
    label: int | None
    choice_lengths: list[int]  # characters of each choice: the acc_norm denominator
    shot: tuple[str, str]  # (question, answer) when this line serves as a few-shot example


def _environment() -> Any:
    import jinja2  # only task rendering needs it

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = lambda s, pattern, repl, count=0: re.sub(pattern, repl, s, count=count)
    return env


def read_items(spec: TaskSpec, path: Path, limit: int = 0) -> list[Item]:
    """Render every line of a JSONL file; a line that does not fit the task raises naming the line."""
    import jinja2

    if not path.is_file():
        raise UserError(f"{path}: no such task data file")
    env = _environment()
    context = env.from_string(spec.context) if spec.context else None
    continuation = env.from_string(spec.continuation) if spec.continuation else None
    choices = env.compile_expression(spec.choices, undefined_to_none=False) if spec.choices else None
    label = env.compile_expression(spec.label, undefined_to_none=False) if spec.label else None
    items = []
    for where, doc in read_records(path):
        if not isinstance(doc, dict):
            raise UserError(f"{where}: expected a JSON object")
        try:
            items.append(_render(spec, doc, _item_number(where), where, context, continuation, choices, label))
        except jinja2.UndefinedError as e:
            raise UserError(f"{where}: missing field ({e.message}) for task {spec.name}") from None
        except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            raise UserError(f"{where}: does not fit task {spec.name} ({type(e).__name__}: {e})") from None
        if limit and len(items) == limit:
            break
    if not items:
        raise UserError(f"{path}: no items (empty file)")
    return items


def _item_number(where: str) -> int:
    """An item's number: its line in a JSON-lines file (`file:7`), its place from 1 in a JSON array (`file[6]`)."""
    if where.endswith("]"):
        return int(where.rpartition("[")[2][:-1]) + 1
    return int(where.rpartition(":")[2])


def _render(spec: TaskSpec, doc: dict, line_no: int, where: str, context, continuation, choices, label) -> Item:
    options: list[str] = []
    if choices is not None:
        options = choices(**doc)
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise UserError(f"{where}: `{spec.choices}` must give a non-empty list of strings, got {options!r}")
    gold: int | None = None
    if label is not None:
        gold = label(**doc)
        if isinstance(gold, bool) or not isinstance(gold, int):
            raise UserError(f"{where}: label `{spec.label}` must give an integer, got {gold!r}")
        if not 0 <= gold < len(options):
            raise UserError(f"{where}: label {gold} is out of range for {len(options)} choices")
    delim = spec.target_delimiter
    if spec.kind == "multiple_choice":
        ctx = context.render(**doc)
        requests = [(ctx, delim + option) for option in options]
        shot = (ctx, options[gold])
    elif spec.kind == "partial":
        cont = continuation.render(**doc)
        requests = [(option, delim + cont) for option in options]
        shot = (options[gold], cont)
    else:
        ctx, cont = context.render(**doc), continuation.render(**doc)
        requests, shot = [(ctx, cont)], (ctx, cont)
    return Item(line_no, doc, requests, gold, [len(o) for o in options], shot)


def fewshot_prefixes(spec: TaskSpec, items: list[Item], pool: list[Item], n: int, seed: int, same: bool) -> list[str]:
    """The few-shot text before each item, drawn as the harness draws it: one random.Random(seed) for the task,
    sampling n (n + 1 when the pool is the evaluated file, then dropping the item itself) per item, in order."""
    if n <= 0:
        return [""] * len(items)
    if len(pool) < n + same:
        raise UserError(f"task {spec.name}: {n}-shot needs at least {n + same} items to draw from, have {len(pool)}")
    rnd = random.Random(seed)
    prefixes = []
    for item in items:
        drawn = rnd.sample(pool, n + 1) if same else rnd.sample(pool, n)
        if same:
            drawn = [d for d in drawn if d.doc != item.doc][:n]
        prefixes.append(
            "".join(q + spec.target_delimiter + a + spec.fewshot_delimiter for q, a in (d.shot for d in drawn))
        )
    return prefixes


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, prefix_id: int) -> tuple[list[int], list[int]]:
    """Token ids as the harness makes them: trailing spaces move to the continuation, the pair is encoded whole
    and the context's own encoding is cut off; an empty context becomes the end-of-text token."""
    if not context:
        cont = tokenizer.encode(continuation)
        return ([prefix_id], cont) if cont[0] != prefix_id else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def evaluate_task(
    model: Transformer,
    tokenizer: Tokenizer,
    spec: TaskSpec,
    data: Path,
    num_fewshot: int = 0,
    fewshot_data: Path | None = None,
    seed: int = 1234,
    limit: int = 0,
    overflow: Overflow = "truncate",
) -> dict[str, float]:
    """The task's metrics over the file (its first `limit` items), with n items and how many were truncated."""
    start = time.perf_counter()
    items = read_items(spec, data, limit)
    same = fewshot_data is None or Path(fewshot_data).resolve() == Path(data).resolve()
    if not num_fewshot:
        pool: list[Item] = []  # zero-shot draws nothing: no second read of the file
    elif same:
        pool = items if not limit else read_items(spec, data)
    else:
        pool = read_items(spec, Path(fewshot_data))  # type: ignore[arg-type]
    prefixes = fewshot_prefixes(spec, items, pool, num_fewshot, seed, same)
    if tokenizer.eos_id is None:
        raise UserError("the tokenizer has no end-of-text token to stand for an empty context")
    window = model.cfg.max_seq_len
    requests, owners, truncated, skipped = [], [], 0, 0
    for i, (item, prefix) in enumerate(zip(items, prefixes, strict=True)):
        pairs = [encode_pair(tokenizer, prefix + ctx, cont, tokenizer.eos_id) for ctx, cont in item.requests]
        longest = max(len(c) + len(k) for c, k in pairs)
        if any(not k for _, k in pairs):
            raise UserError(f"{data}:{item.line}: a continuation encodes to no tokens")
        if longest > window + 1:
            if overflow == "error":
                raise UserError(f"{data}:{item.line}: {longest - 1} tokens do not fit the model's window of {window}")
            if overflow == "skip":
                skipped += 1
                continue
            truncated += 1
        requests += pairs
        owners += [i] * len(pairs)
    if not requests:
        raise UserError(f"task {spec.name}: every item was longer than the model's window and skipped")
    scores = score_requests(model, requests)
    per_item: dict[int, list[tuple[float, bool]]] = {}
    for i, score in zip(owners, scores, strict=True):
        per_item.setdefault(i, []).append(score)
    result = _metrics(spec, [(items[i], s) for i, s in per_item.items()])
    result |= {"n": float(len(per_item)), "truncated": float(truncated), "skipped": float(skipped)}
    result |= {"num_fewshot": float(num_fewshot), "seconds": time.perf_counter() - start}
    return result


def _metrics(spec: TaskSpec, scored: list[tuple[Item, list[tuple[float, bool]]]]) -> dict[str, float]:
    """acc and acc_norm exactly as the harness's process_results (np.argmax: the first of equal maxima wins)."""
    values: dict[str, list[float]] = {m: [] for m in spec.metrics}
    for item, scores in scored:
        lls = [ll for ll, _ in scores]
        if spec.kind == "loglikelihood":
            values.get("acc", []).append(float(scores[0][1]))
            values.get("perplexity", []).append(lls[0])
            continue
        values.get("acc", []).append(float(_argmax(lls) == item.label))
        normed = [ll / n if n else -math.inf for ll, n in zip(lls, item.choice_lengths, strict=True)]
        values.get("acc_norm", []).append(float(_argmax(normed) == item.label))
    out = {}
    for name, xs in values.items():
        if name == "perplexity":
            out[name] = math.exp(-sum(xs) / len(xs))
            continue
        mean = sum(xs) / len(xs)
        out[name] = mean
        if len(xs) > 1:  # the harness's sample standard error of the mean
            out[f"{name}_stderr"] = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))


def task_metrics(model: Transformer, tokenizer: Tokenizer, task_args: Sequence[str], **kwargs: Any) -> dict[str, float]:
    """Each task's metrics as flat `task/metric` values, to log next to the validation loss during training."""
    out = {}
    for arg in task_args:
        spec, data = parse_task_arg(arg)
        result = evaluate_task(model, tokenizer, spec, data, **kwargs)
        out |= {f"{spec.name}/{metric}": result[metric] for metric in spec.metrics}
    return out
