"""The model card: README.md in the Hugging Face layout, written from a model's lineage, so that what the model
is, which text under which licences it learned from, what it was tuned from and how well it scores travel with
the weights. The YAML front matter is what the Hub reads (licence, datasets, base model, model-index); the body is
for people. Not here: reading the lineage (lineage.py) or the run's full report (report.py).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

from nomoat.config import RunConfig, from_dict, read_toml
from nomoat.errors import UserError
from nomoat.files import write_text_atomic
from nomoat.lineage import lineage
from nomoat.load import model_folder, model_kind

# The Hub's licence identifiers (huggingface.co/docs/hub/repositories-licenses); any other licence is "other"
# under its own name.
HUB_LICENSES = frozenset(
    "apache-2.0 mit openrail bigscience-openrail-m creativeml-openrail-m bigscience-bloom-rail-1.0 bigcode-openrail-m "
    "afl-3.0 artistic-2.0 bsl-1.0 bsd bsd-2-clause bsd-3-clause bsd-3-clause-clear c-uda cc cc0-1.0 cc-by-2.0 "
    "cc-by-2.5 cc-by-3.0 cc-by-4.0 cc-by-sa-3.0 cc-by-sa-4.0 cc-by-nc-2.0 cc-by-nc-3.0 cc-by-nc-4.0 cc-by-nd-4.0 "
    "cc-by-nc-nd-3.0 cc-by-nc-nd-4.0 cc-by-nc-sa-2.0 cc-by-nc-sa-3.0 cc-by-nc-sa-4.0 cdla-sharing-1.0 "
    "cdla-permissive-1.0 cdla-permissive-2.0 wtfpl ecl-2.0 epl-1.0 epl-2.0 etalab-2.0 eupl-1.1 eupl-1.2 agpl-3.0 "
    "gfdl gpl gpl-2.0 gpl-3.0 lgpl lgpl-2.1 lgpl-3.0 isc lppl-1.3c ms-pl mpl-2.0 odc-by odbl openrail++ osl-3.0 "
    "postgresql ofl-1.1 ncsa unlicense zlib pddl llama2 llama3 llama3.1 llama3.2 llama3.3 gemma".split()
)
HUB_DATASET = re.compile(r"^https?://huggingface\.co/datasets/([\w.-]+/[\w.-]+)")


def hub_license(licences: list[str | None]) -> tuple[str, str | None]:
    """(license, license_name) for the front matter from the data's licences: one Hub identifier shared by every
    source is the licence; one other licence is "other" under its own name; a source without one makes it
    "unknown"; several different ones are "other" too, since which binds the model is the owner's call (the body
    lists them)."""
    if not licences or any(not text for text in licences):  # a source of unknown terms: so is the model
        return "unknown", None
    names = {_license_id(text) for text in licences if text}
    if len(names) > 1:
        return "other", "mixed"
    [name] = names
    return (name, None) if name in HUB_LICENSES else ("other", name)


def _license_id(text: str) -> str:
    """'CC-BY-SA 4.0' -> 'cc-by-sa-4.0', 'public domain (the plays)' -> 'public-domain'."""
    head = text.split("(")[0].strip().lower()
    return re.sub(r"[^a-z0-9.+]+", "-", head).strip("-") or "unknown"


def write_model_card(
    model: str | Path,
    out_folder: str | Path,
    evals: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
) -> Path:
    """Write out_folder/README.md for the model at `model` (a checkpoint, run, adapter or Hugging Face folder).

    `evals` is one stage of a run's eval/results.json ({"val_bpb": x, "tasks": {task: accuracy}, "task_metrics":
    {"task/metric": value}}) or the results
    of `nomoat eval` ({"results": {name: {metric: value}}}); `license` and `base_model` replace what the lineage
    implies (a local base's path, say, by the Hub repository it was published as)."""
    folder = model_folder(model)
    out = Path(out_folder)
    if not out.is_dir():
        raise UserError(f"{out}: no such folder to write the model card into")
    original = folder / "README.md"
    if model_kind(folder) == "hf" and original.is_file() and evals is None and out.resolve() != folder.resolve():
        # a Hugging Face model passed through: its own card knows more than a lineage that starts here
        shutil.copy(original, out / "README.md")
        return out / "README.md"
    info = lineage(folder)
    name = name or out.resolve().name
    cfg = _run_config(folder)
    meta = front_matter(info, cfg, out, eval_rows(evals or {}), name=name, license=license)
    if base_model or info.get("finetune"):
        meta["base_model"] = base_model or _hub_base(info["base"])
        meta["base_model_relation"] = "adapter" if (out / "adapter_config.json").is_file() else "finetune"
    text = "---\n" + "\n".join(yaml_lines(meta)) + "\n---\n\n" + card_body(info, cfg, meta, name)
    path = out / "README.md"
    return write_text_atomic(path, text)


def training_data(info: dict[str, Any], depth: int = 8) -> list[dict[str, Any]]:
    """Every source the model learned from, its base's first: a fine-tuning checkpoint records only its own
    data, so the chain of local bases is followed back (a base that is not here ends it). Each source gains a
    "stage": "pretraining", or the fine-tuning method."""
    chain, seen = [info], {info["path"]}
    while (base := chain[-1].get("base")) and Path(str(base)).exists() and len(chain) < depth:
        try:
            up = lineage(base)
        except UserError:  # a base that no longer loads: the chain ends at what is known
            break
        if up["path"] in seen:  # a Hugging Face folder is its own base
            break
        chain.append(up)
        seen.add(up["path"])
    return [
        {**source, "stage": f"fine-tuning ({link['finetune']['method']})" if link.get("finetune") else "pretraining"}
        for link in reversed(chain)
        for source in link.get("data") or []
    ]


def _run_config(folder: Path) -> RunConfig | None:
    if model_kind(folder) in ("hf", "gguf") or not (folder / "config.toml").is_file():
        return None
    return from_dict(read_toml(folder / "config.toml"), where=str(folder / "config.toml"))


def _hub_base(recorded: str) -> str:
    """The base as a Hub id where the lineage can tell one: a local folder imported from the Hub names it in its
    Hugging Face config; otherwise the base as the fine-tuning run recorded it."""
    path = Path(recorded)
    for config in (path / "hf_config.json", path / "config.json"):
        if config.is_file():
            hub_id = json.loads(config.read_text()).get("_name_or_path") or ""
            if hub_id and not Path(hub_id).exists():
                return hub_id
    return recorded


def front_matter(
    info: dict[str, Any],
    cfg: RunConfig | None,
    out: Path,
    rows: list[dict[str, Any]],
    *,
    name: str,
    license: str | None,
) -> dict[str, Any]:
    """The YAML metadata the Hub reads, as a dict in the order it is written."""
    sources = training_data(info)
    lic, lic_name = (license, None) if license else hub_license([s["license"] for s in sources] or [None])
    meta: dict[str, Any] = {"license": lic}
    if lic_name:
        meta["license_name"] = lic_name
    # dict.fromkeys: each once, in order (a chats file used by two fine-tuning stages, say)
    datasets = list(dict.fromkeys(m.group(1) if (m := HUB_DATASET.match(s.get("url") or "")) else s["name"]
                                  for s in sources))  # fmt: skip
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "text-generation"
    meta["library_name"] = (
        "peft" if (out / "adapter_config.json").is_file() else "transformers" if _is_hf(out) else "nomoat"
    )
    tags = ["nomoat"]
    if cfg is not None:
        tags.append(_architecture(cfg).removesuffix("ForCausalLM").removesuffix("LMHeadModel").lower())
    if info.get("finetune"):
        tags.append(info["finetune"]["method"])
    meta["tags"] = tags
    if rows:
        meta["model-index"] = [{"name": name, "results": rows}]
    return meta


def _is_hf(out: Path) -> bool:
    return (out / "config.json").is_file() and not (out / "config.toml").is_file()


def _architecture(cfg: RunConfig) -> str:
    from nomoat.convert.hf import architecture_of

    try:
        return architecture_of(cfg.model)
    except UserError:  # a mix of switches no Hugging Face class expresses: still a nomoat model
        return "NomoatTransformer"


def eval_rows(evals: dict[str, Any]) -> list[dict[str, Any]]:
    """model-index results: bits per byte on held-out text and each task's accuracy, finite values only."""
    found: list[tuple[str, str, float]] = []  # (dataset, metric, value)
    if "results" in evals:  # `nomoat eval` results
        for source, metrics in evals["results"].items():
            found += [(source, "bits_per_byte", metrics.get("bits_per_byte")), (source, "accuracy", metrics.get("acc"))]
    else:
        found.append((evals.get("dataset", "validation split"), "bits_per_byte", evals.get("val_bpb")))
        found += [(task, "accuracy", acc) for task, acc in (evals.get("tasks") or {}).items()]
        for key, value in (evals.get("task_metrics") or {}).items():  # "hellaswag/acc_norm"
            task, _, metric = key.partition("/")
            found.append((task, "accuracy" if metric == "acc" else metric, value))
    rows = []
    for dataset, metric, value in found:
        if isinstance(value, int | float) and math.isfinite(value):
            rows.append(
                {
                    "task": {"type": "text-generation", "name": "Text Generation"},
                    "dataset": {"name": dataset, "type": dataset},
                    "metrics": [{"type": metric, "value": round(float(value), 6), "name": metric.replace("_", " ")}],
                }
            )
    return rows


def yaml_lines(value: Any, indent: str = "") -> list[str]:
    """Block-style YAML for dicts, lists and JSON scalars (a JSON string or number is a YAML one)."""
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                lines += [f"{indent}{key}:", *yaml_lines(item, indent + "  ")]
            else:
                lines.append(f"{indent}{key}: {json.dumps(item)}")
        return lines
    for item in value:
        nested = yaml_lines(item, indent + "  ") if isinstance(item, dict | list) and item else []
        if nested:
            lines += [f"{indent}- {nested[0].lstrip()}", *nested[1:]]
        else:
            lines.append(f"{indent}- {json.dumps(item)}")
    return lines


def card_body(info: dict[str, Any], cfg: RunConfig | None, meta: dict[str, Any], name: str) -> str:
    """The prose half: architecture, size, tokenizer, data and licences, base, evaluation, how it was made."""
    lines = [f"# {name}", "", "A language model built with nomoat, which makes the corpus, tokenizer, pretraining, "
             "fine-tuning and evaluation of a model from one toolkit.", "", "## Model", ""]  # fmt: skip
    m = info["model"]
    if cfg is not None:
        mc = cfg.model
        lines.append(
            f"- architecture: {_architecture(cfg)} ({mc.norm}, {mc.mlp}, {mc.pos_emb} positions), "
            f"{mc.n_layer} layers x {mc.d_model}, {mc.n_head} heads ({mc.n_kv_head or mc.n_head} key/value)"
        )
        lines.append(f"- parameters: {m['parameters']:,}; context: {mc.max_seq_len:,} tokens")
    else:
        lines.append(f"- architecture: {m.get('architecture', 'unknown')}")
        if "parameters" in m:
            lines.append(f"- parameters: {m['parameters']:,}; context: {m['context']:,} tokens")
    if info.get("tokenizer"):
        tok = info["tokenizer"]
        lines.append(
            f"- tokenizer: byte-level BPE, {tok['vocab_size']:,} tokens, sha256 `{tok['sha256']}` (of its canonical "
            "JSON, as the shard manifests record it)"
        )
    if info.get("finetune"):
        method = info["finetune"]["method"]
        lines.append(f"- fine-tuned ({method}) from `{meta.get('base_model', info['base'])}`")
    lines += ["", "## Training data", ""]
    sources = training_data(info)
    if not sources:
        lines.append("Not recorded.")
    else:
        lines += ["| stage | source | tokens | licence | origin |", "| --- | --- | ---: | --- | --- |"]
        for s in sources:
            tokens = f"{s['tokens']:,}" if s.get("tokens") is not None else "?"
            lines.append(f"| {s['stage']} | {_cell(s['name'])} | {tokens} | {_cell(s['license'] or 'not recorded')} "
                         f"| {_cell(s.get('url') or '')} |")  # fmt: skip
    declared = f"`{meta['license']}`" + (f" ({meta['license_name']})" if meta.get("license_name") else "")
    lines += ["", f"Licence declared in the metadata: {declared}, from the training data's licences unless the "
              "model's owner chose one.", ""]  # fmt: skip
    if meta.get("model-index"):
        lines += ["## Evaluation", "", "| dataset | metric | value |", "| --- | --- | ---: |"]
        for row in meta["model-index"][0]["results"]:
            metric = row["metrics"][0]
            lines.append(f"| {_cell(row['dataset']['name'])} | {metric['name']} | {metric['value']:.4f} |")
        lines.append("")
    lines += ["## How it was made", "", *_made_with(cfg), ""]
    return "\n".join(lines)


def _made_with(cfg: RunConfig | None) -> list[str]:
    if cfg is None:
        return ["Imported into nomoat from another format; see the original model's card for its training."]
    tc = cfg.train
    tokens = tc.steps * tc.batch_size * tc.seq_len * tc.grad_accum
    if cfg.finetune is not None:
        fc = cfg.finetune
        what = f"`nomoat finetune --method {fc.method}` on `{Path(fc.data).name}`"
    else:
        what = "`nomoat train` from random initialisation"
    return [
        f"{what}: {tc.steps:,} steps of {tc.batch_size * tc.grad_accum} x {tc.seq_len} tokens "
        f"({tokens:,} tokens), {tc.optimizer} at peak learning rate {tc.lr:g}, seed {tc.seed}. "
        "`nomoat info MODEL` prints the full lineage, with every input file's sha256."
    ]


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
