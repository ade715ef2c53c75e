"""Results of `nomoat eval`: one dict per run, saved as JSON and as a markdown table, and runs side by side.

A results dict is {"model": ..., "settings": {...}, "results": {name: {metric: value}}}, where a name is a task
or a text source. `evaluate` runs what `nomoat eval` asks for; the scoring itself is `tasks.py` and `loss.py`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nomoat.errors import UserError
from nomoat.eval.tasks import Overflow
from nomoat.files import read_json

# metrics shown in tables, in this order; counts and timings stay in the JSON
SHOWN = ("acc", "acc_norm", "perplexity", "bits_per_byte", "loss")


def evaluate(
    model_path: str | Path,
    *,
    texts: Sequence[str] = (),
    tasks: Sequence[str] = (),
    shards: str | None = None,
    split: str = "val",
    window: int = 0,
    stride: int = 0,
    batch_size: int = 4,
    num_fewshot: int = 0,
    seed: int = 1234,
    limit: int = 0,
    overflow: Overflow = "truncate",
    device: str = "cpu",
    adapter: str | Path | None = None,
) -> dict[str, Any]:
    """Language-modelling metrics over text files (together) and token shards, and each task's metrics.

    A task is `NAME_OR_TOML=DATA.jsonl` (or a definition naming its own data); window 0 is the model's context
    and stride 0 the window, which is the harness's loglikelihood_rolling."""
    from nomoat.data import ShardSet, check_tokenizer_matches
    from nomoat.eval.loss import evaluate_shards, evaluate_text
    from nomoat.eval.tasks import evaluate_task, parse_task_arg
    from nomoat.load import load_model

    ckpt = load_model(model_path, adapter=adapter, device=device)
    window = window or ckpt.model.cfg.max_seq_len
    results: dict[str, dict[str, float]] = {}
    if texts:
        results["text"] = evaluate_text(ckpt.model, ckpt.tokenizer, texts, window, stride, batch_size)
    if shards:
        split_set = ShardSet(shards, split)
        check_tokenizer_matches(split_set.manifest, ckpt.tokenizer, str(ckpt.path / "tokenizer.json"))
        results[f"shards:{split}"] = evaluate_shards(ckpt.model, split_set, window, stride or window, batch_size)
    for arg in tasks:
        spec, data = parse_task_arg(arg)
        results[spec.name] = evaluate_task(
            ckpt.model, ckpt.tokenizer, spec, data, num_fewshot, seed=seed, limit=limit, overflow=overflow
        )
    settings = {"window": window, "stride": stride or window, "num_fewshot": num_fewshot, "fewshot_seed": seed}
    settings |= {"limit": limit, "overflow": overflow, "texts": list(texts), "tasks": list(tasks)}
    if adapter is not None:
        settings["adapter"] = str(adapter)
    return {"model": str(model_path), "settings": settings, "results": results}


def save_results(results: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write path (JSON) and the same name with .md (the table)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    table = path.with_suffix(".md")
    table.write_text(f"# {results.get('model', '')}\n\n" + markdown_table([results], [""]) + "\n")
    return path, table


def load_results(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    results = read_json(path, missing="no such results file")
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise UserError(f'{path}: not a results file of `nomoat eval` (no "results" object)')
    return results


def markdown_table(runs: Sequence[dict[str, Any]], headers: Sequence[str]) -> str:
    """One row per (name, metric) found in any run, one value column per run; '–' where a run lacks it."""
    rows: list[tuple[str, str]] = []
    for run in runs:
        for name, metrics in run["results"].items():
            for metric in SHOWN:
                if metric in metrics and (name, metric) not in rows:
                    rows.append((name, metric))
    cols = [h or "value" for h in headers]
    lines = ["| task | metric | " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * len(cols)]
    for name, metric in rows:
        cells = []
        for run in runs:
            m = run["results"].get(name, {})
            value = f"{m[metric]:.4f}" if metric in m else "–"
            if f"{metric}_stderr" in m:
                value += f" ± {m[metric + '_stderr']:.4f}"
            cells.append(value)
        lines.append(f"| {name} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(paths: Sequence[str | Path]) -> str:
    """Results files side by side, columns named by file."""
    if len(paths) < 2:
        raise UserError("--compare needs at least two results files")
    return markdown_table([load_results(p) for p in paths], [Path(p).stem for p in paths])
