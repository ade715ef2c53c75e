"""The report card of a run: RUN/report.md and a self-contained RUN/report.html (inline CSS, plots as inline PNG,
no script and no external address, so it opens offline and can be mailed as one file).

It reads what the stages left behind: the lineage chain from corpus to final model with file hashes, then each
stage's data, size, wall time, speed, loss curves, evaluation and sample conversations. A `nomoat run` folder
(corpus/, tokenizer/, pretrain/, sft/, dpo/, eval/, model/; any may be missing) or one `nomoat train` or
`nomoat finetune` run folder. Not here: running anything, or the model card (card.py).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nomoat.checkpoint import list_checkpoints
from nomoat.errors import UserError
from nomoat.eval.play_tasks import change_line
from nomoat.files import BadLines, file_sha256, read_json, read_records, write_text_atomic
from nomoat.lineage import lineage, stored_values

TRAINING = ("pretrain", "sft", "dpo")
STAGES = ("corpus", "tokenizer", *TRAINING, "eval", "model")
EVAL_KEY = {"pretrain": "base"}  # eval/results.json names the pretrained model "base"
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")


class Code(str):
    """Text shown as code: hashes, paths, commands."""


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    alt: str
    png: bytes
    file: str | None  # a PNG beside the report that report.md shows instead (report.html inlines `png`)


@dataclass(frozen=True)
class Chat:
    title: str
    messages: list[dict[str, str]]


Block = Heading | Para | Table | Image | Chat


def build_report(run: str | Path) -> tuple[Path, Path]:
    """Write RUN/report.md and RUN/report.html, each atomically; returns their paths."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"{run}: no such run folder")
    blocks = report_blocks(run)
    if not blocks:
        raise UserError(f"{run}: nothing to report (no stage folders, metrics.jsonl or checkpoints)")
    title = f"Report card: {run.resolve().name}"
    paths = run / "report.md", run / "report.html"
    for path, text in zip(paths, (render_markdown(title, blocks), render_html(title, blocks)), strict=True):
        write_text_atomic(path, text)
    return paths


def is_training_run(folder: Path) -> bool:
    return (folder / "metrics.jsonl").is_file() or bool(list_checkpoints(folder))


def report_blocks(run: Path) -> list[Block]:
    """Every block of the report, in order; empty when the folder holds nothing a report could show."""
    if is_training_run(run):  # one `nomoat train` or `nomoat finetune` run
        stage = TrainingStage.read(run, "")
        return [Heading(2, "Lineage"), lineage_table(single_chain(stage)), *stage.blocks(run, {}, [])]
    present = [name for name in STAGES if (run / name).is_dir()]
    if not present:
        return []
    results = read_results(run / "eval" / "results.json") if (run / "eval" / "results.json").is_file() else None
    evals, samples = (results or {}).get("stages", {}), (results or {}).get("samples", [])
    stages = {name: TrainingStage.read(run / name, name) for name in TRAINING if is_training_run(run / name)}
    blocks: list[Block] = [Heading(2, "Lineage"), lineage_table(pipeline_chain(run, stages))]
    if (run / "corpus").is_dir():
        blocks += corpus_blocks(run)
    if (run / "tokenizer").is_dir():
        blocks += tokenizer_blocks(run)
    for stage in stages.values():
        blocks += stage.blocks(run, evals, samples)
    if results is not None:
        shown = {EVAL_KEY.get(name, name) for name in stages}
        blocks += eval_blocks(run, results, [s for s in samples if s.get("stage") not in shown])
    if (run / "model").is_dir():
        blocks += model_blocks(run)
    return blocks


# ---- reading the stages


def stage_line(folder: Path) -> Para | None:
    """When a stage finished and how long it took, from the stage.json that `nomoat run` leaves."""
    if not (folder / "stage.json").is_file():
        return None
    info = read_json(folder / "stage.json")
    if not isinstance(info, dict):
        raise UserError(f"{folder / 'stage.json'}: expected a JSON object")
    parts = []
    if isinstance(info.get("wall_s"), int | float):
        parts.append(f"wall time {_duration(info['wall_s'])}")
    if info.get("finished"):
        parts.append(f"finished {info['finished']}")
    if info.get("fingerprint"):
        parts.append(f"fingerprint {str(info['fingerprint'])[:16]}")
    return Para("; ".join(parts)) if parts else None


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def weights_file(checkpoint: Path) -> Path | None:
    """The file that holds a checkpoint's final weights: the model, or a LoRA checkpoint's adapter."""
    return next((checkpoint / n for n in reversed(WEIGHTS) if (checkpoint / n).is_file()), None)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows; a torn last line (a run killed mid-write) is named on stderr and skipped."""
    if not path.is_file():
        return []
    bad = BadLines(shown=3)
    rows = [r for _, r in read_records(path, bad_lines=bad) if isinstance(r, dict)]
    bad.close()
    return rows


@dataclass
class TrainingStage:
    """A `nomoat train` or `nomoat finetune` run folder: its newest checkpoint, metrics and lineage."""

    name: str
    folder: Path
    checkpoint: Path | None
    rows: list[dict[str, Any]]
    info: dict[str, Any] | None
    weights: Path | None
    sha256: str | None

    @classmethod
    def read(cls, folder: Path, name: str) -> TrainingStage:
        found = list_checkpoints(folder)
        checkpoint = found[-1] if found else None
        info = lineage(checkpoint) if checkpoint else None
        if not name:  # a lone run folder is named by what it did
            name = "finetune" if info and info.get("finetune") else "pretrain"
        weights = weights_file(checkpoint) if checkpoint else None
        sha = file_sha256(weights) if weights else None
        return cls(name, folder, checkpoint, read_metrics(folder / "metrics.jsonl"), info, weights, sha)

    @property
    def train_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if "loss" in r and "step" in r]

    @property
    def val_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if "val_loss" in r and "step" in r]

    def blocks(self, run: Path, evals: dict[str, Any], samples: list[dict[str, Any]]) -> list[Block]:
        """This stage's section: what it learned from, its size and speed, its curves, its scores and samples."""
        out: list[Block] = [Heading(2, f"Stage: {self.name}")]
        if line := stage_line(self.folder):
            out.append(line)
        out += [Heading(3, "Data"), *data_blocks(self.info)]
        out += [Heading(3, "Training"), Table(["", ""], self.summary())]
        if self.train_rows:
            loss_png = self.folder / "loss.png"
            file = str(loss_png.relative_to(run)) if loss_png.is_file() else None
            out.append(Image(f"{self.name}: loss curves against steps and against time", self.plot(), file))
        key = EVAL_KEY.get(self.name, self.name)
        if key in evals:
            out += [Heading(3, "Evaluation"), eval_table({key: evals[key]})]
        mine = [s for s in samples if s.get("stage") == key]
        if mine:
            out.append(Heading(3, "Sample conversations"))
            out += [Chat(_sample_title(key, i, s), s["messages"]) for i, s in enumerate(mine, 1)]
        return out

    def summary(self) -> list[list[str]]:
        """(what, value) rows: size, steps, time, speed, final losses, decisions, base, weights hash."""
        rows: list[list[str]] = []
        if self.info and "parameters" in self.info["model"]:
            m = self.info["model"]
            rows.append(["parameters", f"{m['parameters']:,} ({m['layers']} layers x {m['d_model']})"])
        if self.weights is not None and self.weights.name == "adapter_model.safetensors":
            rows.append(["adapter parameters", f"{adapter_parameters(self.weights):,} (LoRA)"])
        if self.info and self.info.get("finetune"):
            rows.append(["fine-tuned from", Code(str(self.info["base"]))])
            rows.append(["method", self.info["finetune"]["method"]])
        train, val = self.train_rows, self.val_rows
        if train:
            rows.append(["steps", f"{train[-1]['step']:,}"])
            elapsed = [r["elapsed_s"] for r in self.rows if "elapsed_s" in r]
            if elapsed:
                rows.append(["training time", _duration(max(elapsed))])
            speeds = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
            if speeds:
                rows.append(["tokens/s (median over steps)", f"{statistics.median(speeds):,.0f}"])
            rows.append(["final train loss", f"{train[-1]['loss']:.4f}"])
        if val:
            rows.append(["final validation loss", f"{val[-1]['val_loss']:.4f}"])
            if "val_bpb" in val[-1]:
                rows.append(["final validation bits per byte", f"{val[-1]['val_bpb']:.4f}"])
        last = self.rows[-1] if self.rows else {}
        rows += [[k, f"{v:.4f}"] for k, v in last.items() if k.startswith("rewards/") and isinstance(v, float)]
        for row in self.rows:  # decisions the run took for itself (precision, a time budget's steps)
            rows += [[k, f"{row[k]} ({row.get(k + '_reason', '')})"] for k in ("dtype", "steps") if _decision(row, k)]
        if self.checkpoint is not None:
            rows.append(["checkpoint", Code(str(self.checkpoint.relative_to(self.folder.parent)))])
        if self.sha256:
            rows.append([f"{self.weights.name} sha256", Code(self.sha256)])  # type: ignore[union-attr]
        return rows

    def plot(self) -> bytes:
        """Loss against step and against seconds; for DPO also the reward margin and accuracy."""
        from matplotlib.figure import Figure

        from nomoat.train import draw_losses, loss_panels

        train, val = self.train_rows, self.val_rows
        rewards = [r for r in train if "rewards/margins" in r]
        panels = loss_panels(train, val)
        fig = Figure(figsize=(5 * (len(panels) + bool(rewards)), 3.6))
        axes = fig.subplots(1, len(panels) + bool(rewards), squeeze=False)[0]
        draw_losses(axes, panels, train, val)
        if rewards:
            ax = axes[-1]
            ax.plot([r["step"] for r in rewards], [r["rewards/margins"] for r in rewards], label="reward margin")
            if all("rewards/accuracies" in r for r in rewards):
                ax.plot([r["step"] for r in rewards], [r["rewards/accuracies"] for r in rewards], label="accuracy")
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        return png_bytes(fig)


def _decision(row: dict[str, Any], key: str) -> bool:
    return key in row and "loss" not in row and "val_loss" not in row and f"{key}_reason" in row


def adapter_parameters(path: Path) -> int:
    """Parameters in a safetensors file, from its header alone."""
    return sum(stored_values(path).values())


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


def data_blocks(info: dict[str, Any] | None) -> list[Block]:
    """The sources a model learned from, as its lineage records them: names, licences, tokens."""
    sources = (info or {}).get("data") or []
    if not sources:
        return [Para("Not recorded.")]
    rows = [
        [s["name"], s["license"] or "not recorded", "?" if s["tokens"] is None else f"{s['tokens']:,}",
         str(len(s["files"])), s["url"] or ""]
        for s in sources
    ]  # fmt: skip
    return [Table(["source", "licence", "tokens", "files", "origin"], rows)]


def shards_folder(run: Path) -> Path | None:
    """Where a run's token shards are: built from a data recipe by the corpus stage, or from text files by the
    tokenizer stage, or (a hand-made run) the corpus folder itself."""
    found = (run / "corpus" / "shards", run / "tokenizer" / "shards", run / "corpus")
    return next((f for f in found if (f / "manifest.json").is_file()), None)


def corpus_blocks(run: Path) -> list[Block]:
    out: list[Block] = [Heading(2, "Stage: corpus")]
    if line := stage_line(run / "corpus"):
        out.append(line)
    folder = shards_folder(run)
    if folder is None or not (folder / "datasheet.json").is_file():
        return [*out, Para("No datasheet: the shards are not built, or were built without one.")]
    sheet = read_json(folder / "datasheet.json")
    rows = [
        [s["name"], s.get("license") or "not recorded", f"{s.get('documents_out', 0):,}", f"{s.get('tokens_out', 0):,}",
         f"{s['token_share']:.1%}" if "token_share" in s else "", s.get("url") or ""]
        for s in sheet.get("sources", [])
    ]  # fmt: skip
    out.append(Table(["source", "licence", "documents", "tokens", "share", "origin"], rows))
    splits = sheet.get("splits", {})
    out.append(Para(", ".join(f"{name}: {s['tokens']:,} tokens, {s['documents']:,} documents" for name, s in
                              splits.items())))  # fmt: skip
    if (folder / "mixture.png").is_file():
        mixture = folder / "mixture.png"
        out.append(Image("corpus mixture", mixture.read_bytes(), str(mixture.relative_to(run))))
    return out


def tokenizer_blocks(run: Path) -> list[Block]:
    from nomoat.tokenizer import Tokenizer

    folder = run / "tokenizer"
    out: list[Block] = [Heading(2, "Stage: tokenizer")]
    if line := stage_line(folder):
        out.append(line)
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.load(folder / "tokenizer.json")
        sha = Code(file_sha256(folder / "tokenizer.json"))
        rows = [["vocabulary", f"{tok.vocab_size:,} tokens"], ["tokenizer.json sha256", sha]]
        # the hash shard manifests and model cards name it by: of its canonical JSON, not of one file's formatting
        rows.append(["canonical sha256", Code(tok.sha256)])
        out.append(Table(["", ""], rows))
    return out


def model_blocks(run: Path) -> list[Block]:
    folder = run / "model"
    out: list[Block] = [Heading(2, "Final model")]
    if line := stage_line(folder):
        out.append(line)
    if not (folder / "config.toml").is_file():
        return [*out, Para("model/ holds no nomoat checkpoint.")]
    info = lineage(folder)
    rows = [["parameters", f"{info['model']['parameters']:,}"], ["base", Code(str(info["base"] or "none"))]]
    if weights := weights_file(folder):
        rows.append([f"{weights.name} sha256", Code(file_sha256(weights))])
    if (folder / "README.md").is_file():
        rows.append(["model card", Code("model/README.md")])
    return [*out, Table(["", ""], rows)]


# ---- evaluation


def read_results(path: Path) -> dict[str, Any]:
    """eval/results.json, checked for the shape the report reads, with one line naming what is wrong."""
    results = read_json(path)
    if not isinstance(results, dict) or not isinstance(results.get("stages", {}), dict):
        raise UserError(f'{path}: expected {{"stages": {{stage: {{...}}}}, "samples": [...]}}')
    for name, stage in results.get("stages", {}).items():
        if not isinstance(stage, dict) or not all(
            isinstance(stage.get(k) or {}, dict) for k in ("tasks", "task_metrics", "vs_previous")
        ):
            raise UserError(
                f'{path}: stage "{name}" must be an object whose "tasks", "task_metrics" and "vs_previous" are objects'
            )
    samples = results.get("samples", [])
    for i, s in enumerate(samples if isinstance(samples, list) else [None]):
        ok = isinstance(s, dict) and isinstance(s.get("messages"), list)
        if not ok or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in s["messages"]):
            raise UserError(f'{path}: samples[{i}] must be {{"stage": ..., "messages": [{{"role", "content"}}]}}')
    return results


def eval_table(evals: dict[str, Any]) -> Table:
    """One row per stage: bits per byte, each chat task's accuracy, their mean and its change from the stage
    before on the same items (with the McNemar p-value), then any other task's metrics (`hellaswag/acc`)."""
    tasks = sorted({t for stage in evals.values() for t in stage.get("tasks", {})})
    others = sorted({k for stage in evals.values() for k in stage.get("task_metrics") or {}})
    paired = any("vs_previous" in stage for stage in evals.values())
    rows = []
    for name, stage in evals.items():
        cells = [_number(stage.get("val_bpb")), *(_number(stage.get("tasks", {}).get(t)) for t in tasks)]
        cells += [_number(stage.get("accuracy")), *([_change(stage.get("vs_previous"))] if paired else [])]
        cells += [_number((stage.get("task_metrics") or {}).get(k)) for k in others]
        rows.append([name, *cells])
    change = ["change (McNemar p)"] if paired else []
    return Table(["stage", "bits per byte", *tasks, "mean accuracy", *change, *others], rows)


def _change(change: dict[str, Any] | None) -> str:
    if not change or not {"change", "p_value", "stage"} <= change.keys():
        return "–"
    return change_line(change, counts=False)


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


def _sample_title(stage: str, i: int, sample: dict[str, Any]) -> str:
    expected = f" (expected: {sample['expected']})" if "expected" in sample else ""
    return f"{stage} sample {i}{expected}"


def eval_blocks(run: Path, results: dict[str, Any], samples: list[dict[str, Any]]) -> list[Block]:
    evals = results.get("stages", {})
    out: list[Block] = [Heading(2, "Evaluation across stages")]
    if line := stage_line(run / "eval"):
        out.append(line)
    out.append(eval_table(evals) if evals else Para("No stage was evaluated."))
    if isinstance(held := results.get("heldout"), int) and held:
        out.append(Para(
            f"Chat-task accuracy: greedy answers, exact match, on {held:,} held-out items. The change column "
            "compares each stage with the one before on the same items: the exact McNemar test's p-value is the "
            "chance of a change at least this large if the two models were equally good."
        ))  # fmt: skip
    if samples:
        out.append(Heading(3, "Sample conversations"))
        out += [Chat(_sample_title(s.get("stage", "?"), i, s), s["messages"]) for i, s in enumerate(samples, 1)]
    return out


# ---- the lineage chain


def _link(step: str, path: Path, root: Path, note: str) -> list[str]:
    sha = Code(file_sha256(path)) if path.is_file() else "missing"
    return [step, Code(str(path.relative_to(root)) if path.is_relative_to(root) else str(path)), sha, note]


def pipeline_chain(run: Path, stages: dict[str, TrainingStage]) -> list[list[str]]:
    """corpus -> tokenizer -> each training stage -> final model, each with the hash of what it produced."""
    links = [
        _link("corpus", run / "corpus" / n, run, "text")
        for n in ("train.txt", "val.txt")
        if (run / "corpus" / n).is_file()
    ]
    if (run / "tokenizer").is_dir():
        links.append(_link("tokenizer", run / "tokenizer" / "tokenizer.json", run, ""))
    if shards := shards_folder(run):
        sheet = shards / "datasheet.json"
        names = [s["name"] for s in read_json(sheet).get("sources", [])] if sheet.is_file() else []
        links.append(_link("shards", shards / "manifest.json", run, "sources: " + ", ".join(names)))
    for stage in stages.values():
        base = stage.info.get("base") if stage.info else None
        note = f"from {base}" if base else "from random initialisation"
        if stage.weights is None:
            links.append([stage.name, Code(str(stage.folder.relative_to(run))), "no checkpoint", note])
        else:
            links.append(_link(stage.name, stage.weights, run, note))
        if (stage.folder / "merged" / WEIGHTS[0]).is_file():  # a LoRA stage's adapter folded in, for the next stage
            links.append(_link(f"{stage.name} merged", stage.folder / "merged" / WEIGHTS[0], run, "adapter merged"))
    if (run / "model").is_dir():
        weights = weights_file(run / "model")
        links.append(_link("model", weights or run / "model" / WEIGHTS[0], run, "the final model"))
    return links


def single_chain(stage: TrainingStage) -> list[list[str]]:
    """A lone run's chain: its data, its tokenizer, its base (fine-tunes), its final weights."""
    root = stage.folder
    if stage.checkpoint is None:
        return []
    links = []
    if stage.info and stage.info.get("finetune"):
        data = json.loads((stage.checkpoint / "manifest.json").read_text()).get("inputs", [])
        links += [["data", Code(d["path"]), Code(d["sha256"]), f"{d['tokens']:,} tokens"] for d in data]
    elif (stage.checkpoint / "manifest.json").is_file():
        names = ", ".join(s["name"] for s in (stage.info or {}).get("data") or [])
        links.append(_link("data", stage.checkpoint / "manifest.json", root, f"shard manifest; sources: {names}"))
    links.append(_link("tokenizer", stage.checkpoint / "tokenizer.json", root, ""))
    if stage.info and stage.info.get("finetune"):
        base = Path(str(stage.info["base"]))
        found = list_checkpoints(base) if base.is_dir() else []
        weights = weights_file(found[-1] if found else base) if base.is_dir() else None
        links.append(_link("base", weights, root, "") if weights else ["base", Code(str(base)), "not found here", ""])
    if stage.weights is not None:
        links.append(_link(stage.name, stage.weights, root, "final weights"))
    return links


def lineage_table(links: list[list[str]]) -> Table:
    return Table(["stage", "file", "sha256", "notes"], links)


# ---- rendering


def _md(text: str) -> str:
    """Text for markdown: no raw HTML, no table breaks."""
    return html.escape(str(text), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_cell(value: str) -> str:
    return f"`{value}`" if isinstance(value, Code) else _md(value)


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks inside the text, so that the text cannot close it."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    return "`" * max(3, longest + 1)


def render_markdown(title: str, blocks: list[Block]) -> str:
    """Markdown with every text escaped (no raw HTML reaches a renderer); conversations sit in code fences, so
    that what a model said shows as it said it."""
    lines = [f"# {_md(title)}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + _md(b.text), ""]
        elif isinstance(b, Para):
            lines += [_md(b.text), ""]
        elif isinstance(b, Table):
            lines.append("| " + " | ".join(_md(h) for h in b.headers) + " |")
            lines.append("|" + " --- |" * len(b.headers))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif isinstance(b, Image):
            lines += [f"![{_md(b.alt)}]({b.file})" if b.file else f"*{_md(b.alt)}: see report.html*", ""]
        elif isinstance(b, Chat):
            lines += [f"**{_md(b.title)}**", ""]
            for m in b.messages:
                fence = _fence(str(m["content"]))
                lines += [f"{_md(m['role'])}:", "", fence + "text", str(m["content"]), fence, ""]
    return "\n".join(lines)


CSS = """
body { font: 15px/1.5 system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { border-bottom: 2px solid #333; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .8rem 0; } td, th { border: 1px solid #ddd; padding: .25rem .6rem; }
th { background: #f4f4f4; text-align: left; } td { vertical-align: top; }
code { font-size: 13px; word-break: break-all; } img { max-width: 100%; display: block; margin: .8rem 0; }
.chat { border: 1px solid #ddd; border-radius: 6px; padding: .4rem .8rem; margin: .8rem 0; }
.msg { white-space: pre-wrap; margin: .3rem 0; } .role { font-weight: 600; margin-right: .4rem; }
.user { color: #1b4f8a; } .assistant { color: #1d6b35; } .system { color: #777; }
"""
# Nothing may load from anywhere: the page is one file that opens offline, and a mailed report makes no requests.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _html_cell(value: str) -> str:
    return f"<code>{html.escape(value)}</code>" if isinstance(value, Code) else html.escape(str(value))


def render_html(title: str, blocks: list[Block]) -> str:
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{_html_cell(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            head = f"<thead><tr>{head}</tr></thead>" if any(b.headers) else ""  # a (what, value) table has none
            body.append(f"<table>{head}<tbody>{rows}</tbody></table>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.png).decode("ascii")
            body.append(f'<img alt="{e(b.alt)}" src="data:image/png;base64,{data}">')
        elif isinstance(b, Chat):
            msgs = "".join(
                f'<div class="msg {e(str(m["role"]))}"><span class="role">{e(str(m["role"]))}</span>'
                f"{e(str(m['content']))}</div>"
                for m in b.messages
            )
            body.append(f'<div class="chat"><strong>{e(b.title)}</strong>{msgs}</div>')
    head = (f'<meta charset="utf-8"><meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>{e(title)}</title><style>{CSS}</style>")  # fmt: skip
    return f"<!DOCTYPE html>\n<html><head>{head}</head><body>\n" + "\n".join(body) + "\n</body></html>\n"
