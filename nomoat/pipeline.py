"""`nomoat run RECIPE.toml`: corpus -> tokenizer -> pretrain -> sft -> dpo -> eval -> report, each stage optional.

A run recipe names the stages it wants, in TOML tables of those names; the order is fixed. Each stage works in
its own folder of the run folder and, when done, writes `stage.json` with a fingerprint of its settings and of
the stages before it. A rerun skips a stage whose fingerprint still matches, reruns a changed one and every stage
after it (their fingerprints chain), and resumes a stage that was interrupted: training stages from their newest
checkpoint, bit for bit, the others from scratch (they are short and write their outputs atomically). Every
stage is the library call that its single command makes (no second implementation): `data build` and
`tokenizer train` for the corpus, `train`, `finetune` (SFT, then DPO), the play tasks and bits per byte for
evaluation, `report` for the report card. Not here: the recipe's dataclasses (run_recipe.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nomoat.checkpoint import list_checkpoints
from nomoat.config import RunConfig, from_dict, read_toml, resolve_preset, to_toml
from nomoat.data.datasheet import write_files_datasheet
from nomoat.errors import UserError
from nomoat.files import atomic_folder, write_text_atomic
from nomoat.run_recipe import STAGE_SETTINGS, STAGES, RunRecipe, TrainStage, check_inputs, merge_tables, recipe_dict

VERSION = 2  # bump when a stage's output changes for the same settings: older runs then redo it
TRAINING = ("pretrain", "sft", "dpo")
BUILTIN_TEXT = Path(__file__).parent / "assets" / "tinyshakespeare.txt"
SHAKESPEARE = {
    "name": "tiny shakespeare",
    "license": "public domain (Shakespeare's plays; the file is char-rnn's data/tinyshakespeare/input.txt)",
    "url": "https://github.com/karpathy/char-rnn",
}


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class StageInterrupted(Exception):
    """Ctrl-C (or SIGTERM) inside a stage: what was saved, and how to go on."""

    def __init__(self, stage: str, signum: int, detail: str) -> None:
        super().__init__(f"interrupted in stage {stage!r} ({detail}); run the same `nomoat run` again to continue")
        self.stage, self.signum = stage, signum


class Pipeline:
    """One run of a recipe: the run folder, what each stage produced, and which stages to force."""

    def __init__(self, recipe: RunRecipe, nproc: int = 1, start_from: str | None = None, progress: bool = True):
        if start_from is not None and start_from not in STAGES:
            raise UserError(f"--from {start_from!r}: unknown stage (stages: {', '.join(STAGES)})")
        self.recipe, self.nproc, self.progress = recipe, nproc, progress
        self.run = Path(recipe.out_dir)
        self.forced = set(STAGES[STAGES.index(start_from) :]) if start_from else set()
        self.outputs: dict[str, dict[str, Any]] = {}
        self.ran: set[str] = set()  # stages (re)run in this session, not skipped
        self.fingerprint = hashlib.sha256(f"nomoat-run-{VERSION}".encode()).hexdigest()

    def stages(self) -> list[str]:
        return [s for s in STAGES if getattr(self.recipe, s) is not None]

    def execute(self) -> dict[str, dict[str, Any]]:
        """Run (or skip) every stage in order; returns each stage's outputs."""
        check_inputs(self.recipe)
        self.run.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run / "recipe.toml", self.recipe.to_toml())
        stages = self.stages()
        last_training = next((s for s in reversed(stages) if s in TRAINING), None)
        for stage in stages:
            self._stage(stage)
            if stage == last_training:
                fresh = stage in self.ran or not (self.run / "model").is_dir()
                self.outputs["model"] = {"model": str(self.publish() if fresh else self.run / "model")}
        return self.outputs

    def _stage(self, stage: str) -> None:
        folder = self.run / stage
        settings = recipe_dict(self.recipe).get(stage, {})
        inputs = {"settings": settings, "before": self.fingerprint, "files": self._input_files(stage)}
        self.fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        done = _read_json(folder / "stage.json")
        if done.get("fingerprint") == self.fingerprint and stage not in self.forced:
            self.outputs[stage] = done["outputs"]
            say(f"[{stage}] up to date (finished {done['finished']}); skipped")
            return
        started = _read_json(folder / "started.json")
        if started.get("fingerprint") != self.fingerprint or stage in self.forced:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            started = {"fingerprint": self.fingerprint, "wall_s": 0.0}
            write_text_atomic(folder / "started.json", json.dumps(started))
            say(f"[{stage}] starting")
        else:
            say(f"[{stage}] resuming")
        t0 = time.perf_counter()
        try:
            outputs = RUNNERS[stage](self, folder)
        finally:
            started["wall_s"] += time.perf_counter() - t0
            write_text_atomic(folder / "started.json", json.dumps(started))
        record = {"stage": stage, "fingerprint": self.fingerprint, "inputs": inputs, "wall_s": started["wall_s"]}
        record |= {"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "outputs": outputs}
        write_text_atomic(folder / "stage.json", json.dumps(record, indent=1, default=str))
        self.outputs[stage] = outputs
        self.ran.add(stage)
        say(f"[{stage}] done in {started['wall_s']:.1f} s")

    def _input_files(self, stage: str) -> list[tuple[str, int, int]]:
        """(path, size, mtime) of the user's files a stage reads: an edited file reruns it. Size and time, not a
        hash, so a terabyte corpus is not read twice; the shards' manifest holds the content hashes."""
        paths: list[str] = []
        if stage == "corpus":
            c = self.recipe.corpus
            paths = [*(f for f in c.files if not f.startswith("builtin:")), *([c.recipe] if c.recipe else [])]
        elif stage in TRAINING:
            t: TrainStage = getattr(self.recipe, stage)
            paths = [p for p in (t.data, t.val_data, t.base) if p]
            if t.config and Path(t.config).is_file():
                paths.append(t.config)
        return [entry for p in paths for entry in _stat_tree(Path(p))]

    # -- training stages ---------------------------------------------------------------------------------------

    def last_model(self, before: str) -> str:
        """The model the stage `before` starts from: the newest earlier training stage's."""
        for stage in reversed(TRAINING[: TRAINING.index(before)]):
            if stage in self.outputs:
                return self.outputs[stage]["model"]
        raise UserError(f"[{before}] needs a base: add a [pretrain] stage or set {before}.base")

    def train_config(self, stage: str, folder: Path) -> RunConfig:
        """The stage's RunConfig: its preset or TOML, its tables over it, and the run's own paths."""
        t: TrainStage = getattr(self.recipe, stage)
        config = t.config or ("cpu" if stage == "pretrain" else "")
        raw = read_toml(resolve_preset(config)) if config else {}
        if stage != "pretrain":
            raw.pop("model", None)  # a fine-tune's model is its base's
        raw = merge_tables(merge_tables(raw, t.tables), STAGE_SETTINGS.get(stage, {}))
        raw.setdefault("train", {})["out_dir"] = str(folder)
        if stage == "pretrain":
            made = self.outputs.get("tokenizer") or self.outputs.get("corpus") or {}
            if "shards" not in made or "tokenizer" not in made:
                raise UserError("[pretrain] needs a [tokenizer] stage (corpus files) or a [corpus] data recipe")
            shards, tokenizer = made["shards"], made["tokenizer"]
            raw.setdefault("data", {}).update(shards=shards, tokenizer=tokenizer)
            if "vocab_size" not in t.tables.get("model", {}):  # as `nomoat train`: the tokenizer's, unless set
                from nomoat.train import vocab_from_tokenizer

                cfg, line = vocab_from_tokenizer(from_dict(raw, where=f"recipe [{stage}]"))
                if line:
                    say(f"[{stage}] {line}")
                return cfg
        else:
            ft = raw.setdefault("finetune", {})
            ft["base"] = t.base or self.last_model(stage)
            ft["data"] = t.data or self.outputs["corpus"]["tasks"][stage]
            ft["val_data"] = t.val_data or ft.get("val_data", "")
        return from_dict(raw, where=f"recipe [{stage}]")

    def train_stage(self, stage: str, folder: Path) -> dict[str, Any]:
        from nomoat.finetune import finetune, merge
        from nomoat.train import TrainingInterrupted, train

        cfg = self.train_config(stage, folder)
        resume = bool(list_checkpoints(folder))
        try:
            if self.nproc > 1:
                self._launch(stage, cfg, folder, resume)
            elif stage == "pretrain":
                train(cfg, resume=resume, progress=self.progress)
            else:
                finetune(cfg, resume=resume, progress=self.progress)
        except TrainingInterrupted as e:
            raise StageInterrupted(stage, e.signum, str(e)) from None
        final = list_checkpoints(folder)[-1]
        model = final
        if cfg.finetune is not None and cfg.finetune.method != "full":  # the next stage needs whole weights
            model = folder / "merged"
            merge(final, model)
        return {"checkpoint": str(final), "model": str(model), "config": str(final / "config.toml")}

    def _launch(self, stage: str, cfg: RunConfig, folder: Path, resume: bool) -> None:
        """Under torchrun: the stage's config as a file, run by `nomoat train|finetune --config`."""
        from nomoat.distributed import launch

        path = folder / "config.toml"
        write_text_atomic(path, to_toml(cfg))
        command = "train" if stage == "pretrain" else "finetune"
        launch(self.nproc, [command, "--config", str(path), *(["--resume"] if resume else [])])

    def publish(self) -> Path | None:
        """RUN/model: the last training stage's model, a plain checkpoint folder to chat with, serve, convert."""
        last = next((self.outputs[s]["model"] for s in reversed(TRAINING) if s in self.outputs), None)
        if last is None:
            return None
        out = self.run / "model"
        with atomic_folder(out) as tmp:
            shutil.copytree(last, tmp, dirs_exist_ok=True)
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _stat_tree(path: Path) -> list[tuple[str, int, int]]:
    if not path.exists():
        return [(str(path), -1, -1)]
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


RUNNERS: dict[str, Callable[[Pipeline, Path], dict[str, Any]]] = {}


def _runner(stage: str) -> Callable[[Callable[[Pipeline, Path], dict[str, Any]]], Any]:
    def register(fn: Callable[[Pipeline, Path], dict[str, Any]]) -> Any:
        RUNNERS[stage] = fn
        return fn

    return register


for _stage_name in TRAINING:
    RUNNERS[_stage_name] = lambda p, folder, s=_stage_name: p.train_stage(s, folder)


def corpus_text(files: tuple[str, ...]) -> str:
    """The files' documents as one text, a blank line between documents (the bundled play for builtin:)."""
    from nomoat.data import read_documents

    docs: list[str] = []
    for f in files:
        if f.startswith("builtin:"):
            if f != "builtin:shakespeare":
                raise UserError(f"corpus.files: unknown {f!r} (bundled: builtin:shakespeare)")
            docs.append(BUILTIN_TEXT.read_text())
        else:
            if not Path(f).exists():
                raise UserError(f"corpus.files: {f}: no such file or folder")
            docs.extend(read_documents(f))
    text = "\n\n".join(d.strip("\n") for d in docs)
    if not text.strip():
        raise UserError(f"corpus.files: no text in {', '.join(files)}")
    return text


@_runner("corpus")
def run_corpus(p: Pipeline, folder: Path) -> dict[str, Any]:
    """The text split into training and validation (the last val_fraction, cut at a line), a source record for
    the datasheet, and the play tasks; or a data recipe built into shards."""
    c = p.recipe.corpus
    assert c is not None
    if c.recipe:
        from nomoat.data import build_corpus
        from nomoat.data.recipe import load_recipe

        build_corpus(c.recipe, folder / "shards", progress=p.progress)
        data = load_recipe(c.recipe)
        return {"shards": str(folder / "shards"), "tokenizer": str(data.resolve(data.corpus.tokenizer))}
    text = corpus_text(c.files)
    cut = text.rfind("\n", 0, int(len(text) * (1 - c.val_fraction))) + 1 or int(len(text) * (1 - c.val_fraction))
    out = {"train": str(folder / "train.txt"), "val": str(folder / "val.txt")}
    write_text_atomic(folder / "train.txt", text[:cut])
    write_text_atomic(folder / "val.txt", text[cut:])
    builtin = c.files == ("builtin:shakespeare",)
    source = {"name": c.source, "license": c.license, "url": c.url}
    if builtin:
        source = {k: v or SHAKESPEARE[k] for k, v in source.items()}
    source["name"] = source["name"] or ", ".join(Path(f).name for f in c.files)
    write_text_atomic(folder / "source.json", json.dumps(source, indent=1))
    out["source"] = str(folder / "source.json")
    if c.play_tasks:
        out["tasks"] = write_play_tasks(text[:cut], text[cut:], c.play_tasks, c.shots, folder / "tasks")
        derived = {**source, "name": f"play tasks made from {source['name']}"}  # the text's licence, as its own
        write_files_datasheet(folder / "tasks", [Path(f) for f in out["tasks"].values()], derived)
    say(f"[corpus] {cut:,} training and {len(text) - cut:,} validation characters")
    return out


def write_play_tasks(train: str, val: str, heldout: int, shots: int, folder: Path) -> dict[str, str]:
    """Supervised conversations and preference pairs (disjoint passages) from the training text, few-shot
    examples for the base model, and held-out items from the validation text: passages start at every speech
    there, so that it yields enough items (about 900 from the bundled play's last tenth) to tell a stage's gain
    of a few points from chance."""
    from nomoat.eval.play_tasks import make_items

    items = make_items(train, 10**9, seed=0, stride=1, rename=2)
    held = make_items(val, heldout, seed=1, stride=1)
    if len(held) < heldout:
        raise UserError(f"corpus.play_tasks: the validation text yields {len(held)} items, fewer than {heldout}")
    half = len(items) // 2
    files = {
        "sft": [{"messages": it.conversation()} for it in items[:half]],
        "dpo": [it.preference() for it in items[half:]],
        "heldout": [dataclasses.asdict(it) for it in held],
        "shots": [dataclasses.asdict(it) for it in make_items(train, shots, seed=2)],
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in files.items():
        write_text_atomic(folder / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    say(f"[corpus] play tasks: {half:,} conversations, {len(items) - half:,} preference pairs, {len(held)} held out")
    return {name: str(folder / f"{name}.jsonl") for name in files}


@_runner("tokenizer")
def run_tokenizer(p: Pipeline, folder: Path) -> dict[str, Any]:
    """Train the tokenizer on the corpus's training text, then encode the corpus with it into shards (with
    the datasheet that every checkpoint trained on them carries)."""
    from nomoat.chat import DEFAULT_CHAT_TEMPLATE
    from nomoat.data import build_shards, load_manifest, read_documents, write_source_datasheet
    from nomoat.tokenizer import EOS, train_tokenizer

    t, corpus = p.recipe.tokenizer, p.outputs.get("corpus")
    assert t is not None
    if corpus is None or "train" not in corpus:
        raise UserError("[tokenizer] needs a [corpus] stage of files to train on")
    specials = (EOS, "<|im_start|>", "<|im_end|>") if t.chat_tokens else (EOS,)
    tokenizer = train_tokenizer(read_documents(corpus["train"]), t.vocab_size, special_tokens=specials)
    if t.chat_tokens:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    tokenizer.save(folder / "tokenizer.json")
    shards = folder / "shards"
    build_shards([corpus["train"]], tokenizer, shards, val_inputs=[corpus["val"]], progress=p.progress)
    write_source_datasheet(shards, load_manifest(shards), json.loads(Path(corpus["source"]).read_text()))
    say(f"[tokenizer] {tokenizer.vocab_size} tokens; corpus encoded into {shards}")
    return {"tokenizer": str(folder / "tokenizer.json"), "shards": str(shards)}


def stage_models(p: Pipeline) -> dict[str, str]:
    """The model each training stage ended with, named as the report names them: base, sft, dpo."""
    names = {"pretrain": "base", "sft": "sft", "dpo": "dpo"}
    return {names[s]: p.outputs[s]["model"] for s in TRAINING if s in p.outputs}


@_runner("eval")
def run_eval(p: Pipeline, folder: Path) -> dict[str, Any]:
    """Each model's bits per byte on the validation text, its held-out play-task accuracy (the base model with a
    few-shot prompt, the tuned ones through their chat template) and any task files; eval/results.json."""
    from nomoat.eval.loss import evaluate_text
    from nomoat.eval.play_tasks import change_line, paired_change, read_items, score
    from nomoat.eval.tasks import task_metrics
    from nomoat.load import load_model

    e, corpus = p.recipe.eval, p.outputs.get("corpus", {})
    assert e is not None
    models = stage_models(p)
    if not models:
        raise UserError("[eval] needs a training stage (pretrain, sft or dpo) to evaluate")
    tasks = corpus.get("tasks") if e.play_tasks else None
    held = read_items(tasks["heldout"]) if tasks else []
    shots = read_items(tasks["shots"]) if tasks else []
    val = None
    if e.bpb and "val" in corpus:
        text = Path(corpus["val"]).read_text()
        val = folder / "val_sample.txt"
        write_text_atomic(val, text[: e.max_bytes] if e.max_bytes else text)
    results: dict[str, Any] = {"stages": {}, "samples": [], "heldout": len(held)}
    before: tuple[str, list[bool]] | None = None  # the previous stage's right and wrong items
    for name, path in models.items():
        ckpt = load_model(path)
        row: dict[str, Any] = {"model": path}
        if val is not None:
            row["val_bpb"] = evaluate_text(ckpt.model, ckpt.tokenizer, [val])["bits_per_byte"]
        if held:
            scored = score(ckpt.model, ckpt.tokenizer, held, shots if name == "base" else ())
            row |= {"accuracy": scored["accuracy"], "tasks": scored["tasks"]}
            if before is not None:
                row["vs_previous"] = {"stage": before[0], **paired_change(before[1], scored["correct"])}
            before = (name, scored["correct"])
            for item, reply in list(zip(held, scored["replies"], strict=True))[: e.samples]:
                chat = [*item.conversation()[:1], {"role": "assistant", "content": reply}]
                results["samples"].append({"stage": name, "messages": chat, "expected": item.answer})
        if e.tasks:
            row["task_metrics"] = task_metrics(ckpt.model, ckpt.tokenizer, e.tasks)
        results["stages"][name] = row
        say(f"[eval] {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)))
        if "vs_previous" in row:
            say(f"[eval] {name}: {change_line(row['vs_previous'])}")
    write_text_atomic(folder / "results.json", json.dumps(results, indent=1))
    return {"results": str(folder / "results.json")}


@_runner("report")
def run_report(p: Pipeline, folder: Path) -> dict[str, Any]:
    """report.md and report.html in the run folder, and the final model's model card."""
    from nomoat.card import write_model_card
    from nomoat.report import build_report

    out: dict[str, Any] = {}
    model = p.outputs.get("model", {}).get("model")
    if model:  # the card where the Hub looks (the model folder) and at the top of the run folder
        results = _read_json(Path(p.outputs["eval"]["results"])) if "eval" in p.outputs else {}
        evals = list(results.get("stages", {}).values())[-1:] or [None]
        for folder_ in (Path(model), p.run):
            write_model_card(model, folder_, evals[0], name=p.recipe.name)
        out["model_card"] = str(Path(model) / "README.md")
    md, html = build_report(p.run)
    return out | {"markdown": str(md), "html": str(html)}


def run_recipe(recipe: RunRecipe, nproc: int = 1, start_from: str | None = None, progress: bool = True) -> Pipeline:
    """Run a recipe's stages (see the module's docstring); returns the pipeline with every stage's outputs."""
    pipeline = Pipeline(recipe, nproc=nproc, start_from=start_from, progress=progress)
    pipeline.execute()
    return pipeline
