"""The `nomoat` command: thin functions over library calls, one per subcommand.

Bad input raises UserError, printed here as one line with exit status 2 (`--debug` shows the traceback).
Config fields are overridden by name after `train`: `nomoat train --config cpu --train.lr 3e-4`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from nomoat.errors import UserError


def _print_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)  # default=str: paths


def _report(args: argparse.Namespace, line: str, obj: dict[str, Any]) -> None:
    """The human line on stderr; with --json, the object as the last line of stdout."""
    print(line, file=sys.stderr)
    if args.json:
        _print_json(obj)


def _run_training(args: argparse.Namespace, run: Callable[[], Any]) -> int:
    """Train or fine-tune: the checkpoint line and result, or exit 128 + signal after an interrupt's save."""
    from nomoat.train import TrainingInterrupted

    try:
        result = run()
    except TrainingInterrupted as e:
        print(f"nomoat: {e}; continue with --resume", file=sys.stderr)
        return 128 + e.signum
    except RuntimeError as e:
        from nomoat.distributed import lost_peer

        if (line := lost_peer(e)) is None:
            raise
        print(f"nomoat: error: {line}", file=sys.stderr)
        return 1
    _report(args, f"checkpoint: {result.checkpoint}", dataclasses.asdict(result))
    return 0


def _fields(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named flags as keyword arguments of the library call that a command wraps."""
    return {name: getattr(args, name) for name in names}


def _load(args: argparse.Namespace) -> Any:
    """The MODEL (and --adapter) of a command, through the one loader."""
    from nomoat.load import load_model

    device, quantize = getattr(args, "device", "cpu"), getattr(args, "quantize", None)
    return load_model(args.model, adapter=args.adapter, device=device, quantize=quantize)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from nomoat.data import read_documents
    from nomoat.tokenizer import train_tokenizer

    tok = train_tokenizer(read_documents(*args.inputs), args.vocab_size)  # the files data build would read
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tok.save(args.out)
    line = f"wrote {args.out}: {tok.vocab_size} tokens, sha256 {tok.sha256[:12]}"
    _report(args, line, {"path": args.out, "vocab_size": tok.vocab_size, "sha256": tok.sha256})


def cmd_data_build(args: argparse.Namespace) -> None:
    from nomoat.data import build_shards
    from nomoat.tokenizer import Tokenizer

    if len(args.inputs) == 1 and args.inputs[0].endswith(".toml"):
        return cmd_data_build_recipe(args)
    if args.tokenizer is None:
        raise UserError("data build: --tokenizer is required unless the one input is a recipe .toml")
    if args.engine or args.ray_address:
        raise UserError("data build: --engine and --ray-address apply to a recipe .toml only")
    tok = Tokenizer.load(args.tokenizer)
    start = time.perf_counter()
    manifest = build_shards(
        args.inputs,
        tok,
        args.out,
        val_inputs=args.val or (),
        val_fraction=args.val_fraction,
        progress=not args.json,
        strict=args.strict,
    )
    _report_shards(args, manifest["splits"], start)


def cmd_data_build_recipe(args: argparse.Namespace) -> None:
    from nomoat.data import build_corpus

    if args.tokenizer or args.val:
        raise UserError("data build RECIPE.toml: the tokenizer and validation split are set in the recipe")
    start = time.perf_counter()
    sheet = build_corpus(
        args.inputs[0],
        args.out,
        progress=not args.json,
        strict=args.strict,
        force=args.force,
        engine=args.engine,
        ray_address=args.ray_address,
    )
    sources = {s["name"]: s["tokens_out"] for s in sheet["sources"]}
    extra = {"sources": sources, "skipped": sheet.get("skipped", False)}
    if extra["skipped"]:  # said, lest an unchanged rerun look like a build that took no time
        head = f"skipped the build: {args.out} is up to date with {args.inputs[0]}, its tokenizer and inputs"
        _report_shards(args, sheet["splits"], start, extra, " (--force rebuilds)", head)
    else:
        _report_shards(args, sheet["splits"], start, extra, ", datasheet.md and mixture.png")


def _report_shards(
    args: argparse.Namespace, splits: dict, start: float, extra: dict | None = None, also: str = "", head: str = ""
) -> None:
    """The line and --json summary of a shard build, from files or from a recipe (head: instead of "wrote OUT")."""
    summary = {"out": args.out, "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"]}
    summary |= {**(extra or {}), "seconds": round(time.perf_counter() - start, 3)}
    tokens = f"{summary['train_tokens']:,} train and {summary['val_tokens']:,} val tokens"
    _report(args, f"{head or f'wrote {args.out}'}: {tokens}{also}", summary)


def cmd_train(args: argparse.Namespace, overrides: dict[str, str], argv: list[str]) -> int:
    from nomoat.config import load_config, set_by_user
    from nomoat.train import train, vocab_from_tokenizer

    cfg = load_config(args.config, overrides)  # a bad config is reported once, before any rank starts
    if args.nproc > 1:  # re-enter this command under torchrun, one process per rank
        from nomoat.distributed import launch

        drop = {i for i, a in enumerate(argv) if a == "--nproc"}
        launch(
            args.nproc, [a for i, a in enumerate(argv) if i not in drop | {j + 1 for j in drop} and "--nproc=" not in a]
        )
        return 0
    if not set_by_user(args.config, overrides, "model.vocab_size"):  # a preset's vocabulary follows the tokenizer
        cfg, line = vocab_from_tokenizer(cfg)
        if line and os.environ.get("RANK", "0") == "0":
            print(f"nomoat: {line}", file=sys.stderr)
    return _run_training(args, lambda: train(cfg, resume=args.resume, progress=not args.json))


def cmd_finetune(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from nomoat.config import apply_overrides, from_dict, read_toml, resolve_preset
    from nomoat.finetune import finetune

    raw = read_toml(resolve_preset(args.config)) if args.config else {}
    raw.pop("model", None)  # the model is the base's
    method, objective = args.method, args.objective
    if method == "dpo":  # what users type: shorthand for DPO with LoRA
        if objective not in (None, "dpo"):
            raise UserError(f"--method dpo means --objective dpo (with LoRA), not --objective {objective}")
        method, objective = "lora", "dpo"
    flags = {"finetune.base": args.base, "finetune.data": args.data, "finetune.method": method}
    flags["finetune.objective"] = objective
    overrides = {**{k: v for k, v in flags.items() if v is not None}, **overrides}
    cfg = from_dict(apply_overrides(raw, overrides), where=args.config or "finetune")
    return _run_training(args, lambda: finetune(cfg, resume=args.resume, progress=not args.json))


def cmd_run(args: argparse.Namespace, overrides: dict[str, str]) -> int:
    from nomoat.pipeline import StageInterrupted, run_recipe
    from nomoat.run_recipe import load_run_recipe

    recipe = load_run_recipe(args.recipe, {**overrides, **({"out_dir": args.out} if args.out else {})})
    try:
        pipeline = run_recipe(recipe, nproc=args.nproc, start_from=args.start_from, progress=not args.json)
    except StageInterrupted as e:
        print(f"nomoat: {e}", file=sys.stderr)
        return 128 + e.signum
    outputs = pipeline.outputs
    model = outputs.get("model", {}).get("model")
    lines = [f"run folder: {recipe.out_dir}"]
    if "report" in outputs:
        lines.append(f"report card: {outputs['report']['html']} (and report.md)")
    if model:
        lines += [
            f"talk to it:  nomoat chat {model}",
            f"serve it:    nomoat serve {model} --name {recipe.name}  (OpenAI API, chat page)",
        ]
    _report(args, "\n".join(lines), {"run": recipe.out_dir, "model": model, "stages": outputs})
    return 0


def cmd_merge(args: argparse.Namespace) -> None:
    from nomoat.finetune import merge

    result = merge(args.adapter, args.out, base=args.base, requantize=args.requantize, data=args.data)
    line = f"wrote merged checkpoint {result['out']}"
    if result["bpb_change"] is not None:  # before: the base alone; after: the merged model
        before, after, change = result["bpb_before"], result["bpb_after"], result["bpb_change"]
        line += f"; bits per byte on the fine-tuning data: base {before:.4f} -> merged {after:.4f} ({change:+.4f})"
    _report(args, line, result)


def cmd_chat(args: argparse.Namespace) -> None:
    from nomoat.generate import AUTO_COMPILE_TOKENS, warm_up

    ckpt = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat: an empty line, Ctrl-D or Ctrl-C ends; Ctrl-C during a reply stops it; /reset forgets the "
          'conversation; end a line with \\ to go on to the next, or put a message between """ lines',
          file=sys.stderr)  # fmt: skip
    # the decode step compiles while the first message is typed, so that the first reply does not wait for it
    warming = threading.Thread(target=warm_up, args=(ckpt.model,), daemon=True)
    if args.max_new_tokens >= AUTO_COMPILE_TOKENS:
        warming.start()
    while True:
        try:
            line = read_message(input)
        except (EOFError, KeyboardInterrupt):  # Ctrl-C at the prompt ends the chat, as Ctrl-D does
            line = ""
            print()
        if warming.is_alive():  # also before leaving: a compile is not cut off half-way
            warming.join()
        if not line:
            return
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages = _chat_turn(args, ckpt, [*messages, {"role": "user", "content": line}])


def read_message(read: Callable[[str], str]) -> str:
    """One message from the terminal: a line, or several, each but the last ending in a backslash (llama.cpp's
    convention) or between lines of three double quotes (Ollama's), so a passage can be pasted whole."""
    first = read("> ")
    if first.lstrip().startswith('"""'):
        text = first.lstrip()[3:]
        while not text.rstrip().endswith('"""'):
            text += "\n" + read("... ")
        return text.rstrip()[:-3].strip()
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read("... "))
    return "\n".join(lines).strip()


def _chat_turn(args: argparse.Namespace, ckpt: Any, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Stream the reply to the conversation's last message; the conversation with the reply appended.

    Ctrl-C stops the reply and keeps the part already shown as the assistant's turn, so that what the model
    sees next is what the user saw; stopped before any text, the user's message is withdrawn too."""
    from nomoat.chat import stream_reply
    from nomoat.generate import PromptTooLong

    sampling = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p}
    pieces, stopped, stats = [], False, {}
    try:
        for piece in stream_reply(ckpt.model, ckpt.tokenizer, messages, seed=args.seed, stats=stats, **sampling):
            pieces.append(piece)
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        stopped = True
        print(" [stopped]", end="", flush=True)
    except PromptTooLong as e:  # the chat goes on: the message is withdrawn, and /reset makes room
        print(f"nomoat: the conversation is {e.tokens} tokens, the model's context is {e.context}: "
              "send a shorter message, or /reset to start over", file=sys.stderr)  # fmt: skip
        return messages[:-1]
    print()
    if stats.get("finish") == "context":
        print(f"nomoat: the reply stopped at the model's context of {ckpt.model.cfg.max_seq_len} tokens; "
              "/reset to start over", file=sys.stderr)  # fmt: skip
    reply = "".join(pieces).strip()
    return messages[:-1] if stopped and not reply else [*messages, {"role": "assistant", "content": reply}]


def cmd_generate(args: argparse.Namespace) -> None:
    from nomoat.generate import generate_text, speeds

    ckpt = _load(args)
    pieces = []
    sampling = _fields(args, "max_new_tokens", "temperature", "top_k", "top_p", "seed", "compile")
    stats: dict[str, float] = {}
    stream = generate_text(ckpt.model, ckpt.tokenizer, args.prompt, stop=args.stop or (), stats=stats, **sampling)
    if not args.json:
        print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    for piece in stream:
        pieces.append(piece)
        if not args.json:
            print(piece, end="", flush=True)
    seconds = time.perf_counter() - start
    text = "".join(pieces)
    if args.json:
        _print_json({"text": text, "tokens": len(ckpt.tokenizer.encode(text)), "seconds": seconds, **speeds(stats)})
    else:
        print()
    if stats.get("finish") == "context":  # fewer tokens than asked for, which the user should not have to count
        context = ckpt.model.cfg.max_seq_len
        print(f"nomoat: stopped at the model's context of {context} tokens (prompt {stats['prompt_tokens']:.0f}, "
              f"{context - stats['prompt_tokens']:.0f} new), before --max-new-tokens {args.max_new_tokens}",
              file=sys.stderr)  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> None:
    from nomoat.data import ShardSet, check_tokenizer_matches
    from nomoat.eval import evaluate_loss

    if args.compare or args.text or args.task or args.stride:
        return cmd_eval_report(args)
    if not args.model or not args.shards:
        raise UserError("eval: give MODEL and one of --shards, --text, --task; or --compare A.json B.json")
    ckpt = _load(args)
    shards = ShardSet(args.shards, args.split)
    check_tokenizer_matches(shards.manifest, ckpt.tokenizer, str(ckpt.path / "tokenizer.json"))
    seq_len = args.seq_len or ckpt.cfg.train.seq_len
    result = evaluate_loss(ckpt.model, shards, args.batch_size, seq_len, args.max_batches, args.device)
    print(
        f"{args.split}: loss {result['val_loss']:.4f} nats/token, {result['val_bpb']:.4f} bits per byte",
        file=sys.stderr,
    )
    if args.json:
        _print_json(result)


def cmd_eval_report(args: argparse.Namespace) -> None:
    from nomoat.eval.report import compare, evaluate, markdown_table, save_results

    if args.compare:
        if args.model:
            raise UserError("eval --compare takes results files only, no MODEL")
        print(compare(args.compare))
        return
    if not args.model:
        raise UserError("eval: give the MODEL to evaluate")
    results = evaluate(
        args.model,
        texts=args.text or (),
        tasks=args.task or (),
        window=args.seq_len,
        seed=args.fewshot_seed,
        **_fields(args, "shards", "split", "stride", "batch_size", "num_fewshot", "limit", "overflow", "device"),
        adapter=args.adapter,
    )
    print(markdown_table([results], [""]), file=sys.stderr)
    if args.out:
        paths = save_results(results, args.out)
        print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    if args.json:
        _print_json(results)


def cmd_convert_from_hf(args: argparse.Namespace) -> None:
    from nomoat.convert import from_hf

    out = from_hf(args.hf_dir, args.out)
    print(f"wrote nomoat checkpoint {out}", file=sys.stderr)


def cmd_convert_consolidate(args: argparse.Namespace) -> None:
    from nomoat.checkpoint import consolidate

    print(f"wrote {consolidate(args.checkpoint, args.out)}", file=sys.stderr)


def cmd_convert_to_hf(args: argparse.Namespace) -> None:
    import torch

    from nomoat.card import write_model_card
    from nomoat.convert import to_hf
    from nomoat.load import model_kind

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype or "")
    out = to_hf(_load(args), args.out, dtype=dtype)
    # the card tells what was exported: a fine-tuning run's adapter merged in is that run's model
    tuned = args.adapter and model_kind(args.adapter) == "adapter" and (Path(args.adapter) / "config.toml").is_file()
    write_model_card(args.adapter if tuned else args.model, out)
    print(f"wrote Hugging Face folder {out} with a model card (README.md)", file=sys.stderr)


def cmd_convert_to_gguf(args: argparse.Namespace) -> None:
    from nomoat.convert.gguf_write import adapter_to_gguf, to_gguf
    from nomoat.lineage import lineage
    from nomoat.load import load_model, model_folder

    if args.adapter_only:
        out = adapter_to_gguf(Path(args.adapter) if args.adapter else model_folder(args.model), args.out)
        print(f"wrote LoRA adapter GGUF {out}: load it with llama.cpp's --lora over the base's GGUF", file=sys.stderr)
        return
    # device "meta": the export streams the weights from their files, about one layer in memory at a time
    ckpt = load_model(args.model, adapter=args.adapter, device="meta")
    out = to_gguf(ckpt, args.out, qtype=args.type, lineage=lineage(args.model))
    print(f"wrote GGUF file {out} ({args.type})", file=sys.stderr)


def cmd_convert_from_gguf(args: argparse.Namespace) -> None:
    from nomoat.convert.gguf_read import from_gguf

    print(f"wrote nomoat checkpoint {from_gguf(args.gguf_file, args.out)}", file=sys.stderr)


def cmd_convert_quantize(args: argparse.Namespace) -> None:
    from nomoat.convert.quantized import save_quantized

    out = save_quantized(_load(args), args.out)
    print(f"wrote {args.quantize} checkpoint {out}", file=sys.stderr)


def cmd_info(args: argparse.Namespace) -> None:
    from nomoat.lineage import format_lineage, lineage

    info = lineage(args.model)
    if args.json:
        _print_json(info)
    else:
        print(format_lineage(info))


def cmd_report(args: argparse.Namespace) -> None:
    from nomoat.report import build_report

    md, page = build_report(args.run)
    _report(args, f"{md}\n{page}", {"markdown": md, "html": page})


def cmd_serve(args: argparse.Namespace) -> None:
    from nomoat.serve.app import ServeConfig, bind, serve  # FastAPI and uvicorn load only for this command

    flags = _fields(args, "host", "port", "api_key", "no_api_key", "max_batch", "max_queue", "max_context", "name")
    cfg = ServeConfig(**flags)
    with bind(cfg.host, cfg.port) as sock:  # a busy port is reported now, not after the model has loaded
        serve(_load(args), cfg, sock)


def cmd_demo(args: argparse.Namespace) -> int:
    from nomoat.demo import run_demo
    from nomoat.train import TrainingInterrupted

    try:  # progress goes to stderr either way; --json changes only what stdout gets
        result = run_demo(args.out)
    except TrainingInterrupted as e:  # the checkpoint is saved: say how to go on, as train does
        config = e.checkpoint / "config.toml"
        print(f"nomoat: demo {e}; continue its training with `nomoat train --config {config} --resume`, "
              "or run `nomoat demo` again to start over", file=sys.stderr)  # fmt: skip
        return 128 + e.signum
    if args.json:
        _print_json(result)
    else:
        print("-" * 60 + "\n" + result["sample"] + "\n" + "-" * 60)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes read like every other error: one line and exit status 2 (`--help` still shows usage)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("nomoat").strip()  # "train", "data build"; empty for the top level
        raise UserError(f"{command + ': ' if command else ''}{message} (see --help)")


def _adder(sub: Any) -> Callable[..., argparse.ArgumentParser]:
    """`add(name, help, parent)`: a subcommand with the flags every command has."""

    def add(name: str, helptext: str, parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
        p.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
        return p

    return add


MODEL_HELP = "checkpoint, run or Hugging Face folder, or a LoRA fine-tuning checkpoint"


def _model_args(p: argparse.ArgumentParser, optional: bool = False, device: bool = True) -> None:
    """MODEL and --adapter, as every command that loads a model takes them (nomoat.load.load_model)."""
    p.add_argument("model", nargs="?" if optional else None, help=MODEL_HELP)
    p.add_argument("--adapter", help="a LoRA adapter folder (ours or PEFT's) to apply to MODEL")
    if device:
        p.add_argument("--device", default="cpu")
        p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only int8/int4 for inference (CPU)")


def _add_data_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    tokenizer = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer").add_subparsers(
        dest="action", required=True
    )
    p = add("train", "train a byte-level BPE tokenizer on text files", tokenizer)
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl, .jsonl.zst files or folders")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--out", required=True, help="path of the tokenizer.json to write")
    p.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="build token shards").add_subparsers(dest="action", required=True)
    p = add("build", "tokenize a corpus into memory-mapped shards with a manifest", data)
    p.add_argument("inputs", nargs="+", help=".txt, .jsonl(.zst|.gz), .parquet files or folders; or one recipe .toml")
    p.add_argument("--tokenizer", help="tokenizer.json (required unless the input is a recipe)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val", nargs="+", help="inputs that form the validation split")
    p.add_argument("--val-fraction", type=float, default=0.0005, help="share of documents held out")
    p.add_argument("--strict", action="store_true", help="stop at a JSON line that does not parse, not skip it")
    p.add_argument("--force", action="store_true", help="rebuild a recipe even when its inputs are unchanged")
    p.add_argument("--engine", choices=["local", "ray"], help="run a recipe's stages here or on Ray (default: recipe)")
    p.add_argument("--ray-address", help="Ray cluster to join with --engine ray; default: start a local Ray")
    p.set_defaults(func=cmd_data_build)


def _add_training_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("train", "pretrain a model; config fields are overridable as --section.key value")
    p.add_argument("--config", required=True, help="run TOML file or preset name (cpu, gpt2-124m, ...)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine, started with torchrun")
    p.set_defaults(func=cmd_train)

    p = add(
        "finetune",
        "fine-tune a model on chat, instruction or text data, or by DPO on preference pairs: full, LoRA, or LoRA "
        "over 4-bit NF4",
    )
    p.add_argument("--base", help="nomoat checkpoint, run folder or Hugging Face folder (finetune.base)")
    p.add_argument(
        "--data",
        help=".jsonl/.json chats, Alpaca or {'text'} records, or .txt; for dpo {'prompt', 'chosen', 'rejected'} "
        "records (finetune.data)",
    )
    p.add_argument(
        "--method",
        choices=["full", "lora", "qlora", "dpo"],
        help="finetune.method (default lora); 'dpo' is short for --method lora --objective dpo",
    )
    p.add_argument(
        "--objective", choices=["sft", "dpo"], help="finetune.objective: sft (default) or dpo on preference pairs"
    )
    p.add_argument("--config", help="TOML with [train] and [finetune] sections, or a preset name")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.set_defaults(func=cmd_finetune)

    p = add("run", "run a staged recipe: corpus, tokenizer, pretrain, sft, dpo, eval, report (each optional)")
    p.add_argument("recipe", help="a run recipe .toml, or a bundled one (chat-demo, gpt2-chat)")
    p.add_argument("--out", help="the run folder (the recipe's out_dir)")
    p.add_argument("--from", dest="start_from", metavar="STAGE", help="rerun from this stage on, done or not")
    p.add_argument("--nproc", type=int, default=1, help="processes for the training stages, started with torchrun")
    p.set_defaults(func=cmd_run)

    p = add("merge", "fold a LoRA adapter into full weights (an NF4 base is dequantized, merged in fp32)")
    p.add_argument("adapter", help="a LoRA fine-tuning checkpoint or run folder, or a PEFT adapter folder")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--base", help="the base model; default: the one the fine-tuning run recorded")
    p.add_argument("--requantize", action="store_true", help="snap the merged weights back onto the NF4 grid")
    p.add_argument("--data", help="records to measure bits per byte on; default: the fine-tuning data")
    p.set_defaults(func=cmd_merge)


def _add_inference_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("chat", "talk to a model in the terminal through its chat template; replies stream")
    _model_args(p)
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_chat)

    p = add("generate", "sample text from a model")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", metavar="STR", help="end the text before this string (repeatable)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the decode step (~5 s once, then faster); default: from 64 new tokens on")  # fmt: skip
    p.set_defaults(func=cmd_generate)

    p = add("serve", "an OpenAI-compatible API with continuous batching, and a chat page at /")
    _model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind; beyond localhost a key is required")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API and /metrics "
                   "(on a non-local --host without it, a random key is made and printed once)")  # fmt: skip
    p.add_argument("--no-api-key", action="store_true", help="serve a non-local --host to anyone, with no key")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together in one step")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait for a slot; more get 429")
    p.add_argument("--max-context", type=int, default=4096, help="tokens per sequence, if below the model's context")
    p.add_argument("--name", help="the model id clients send and /v1/models lists; default: the model's folder name")
    p.set_defaults(func=cmd_serve)


def _add_eval_command(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("eval", "loss and bits per byte on shards or text; zero/few-shot tasks; compare results files")
    _model_args(p, optional=True)
    p.add_argument("--shards", help="token shards folder (loss and bits per byte of --split)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--text", nargs="+", help=".txt files (one document each) or .jsonl with a text field")
    p.add_argument("--task", nargs="+", help="NAME=DATA.jsonl (hellaswag, arc_easy, ...) or TASK.toml[=DATA.jsonl]")
    p.add_argument("--num-fewshot", type=int, default=0)
    p.add_argument("--fewshot-seed", type=int, default=1234, help="the harness's default, for the same draws")
    p.add_argument("--limit", type=int, default=0, help="score only the first N items of each task")
    p.add_argument(
        "--overflow", default="truncate", choices=["truncate", "skip", "error"], help="items longer than the window"
    )
    p.add_argument("--stride", type=int, default=0, help="rolling windows move by this much; 0: the window")
    p.add_argument("--out", help="write the results as this JSON file and a markdown table beside it")
    p.add_argument("--compare", nargs="+", metavar="RESULTS", help="print results files side by side")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="0: training seq_len (shards) or the model's context")
    p.add_argument("--max-batches", type=int, default=0, help="0: the whole split")
    p.set_defaults(func=cmd_eval)


def _add_model_file_commands(sub: Any, add: Callable[..., argparse.ArgumentParser]) -> None:
    convert = sub.add_parser("convert", help="convert between nomoat, Hugging Face and GGUF models")
    convert = convert.add_subparsers(dest="action", required=True)
    p = add("from-hf", "turn a Hugging Face model folder into a nomoat checkpoint", convert)
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors and tokenizer.json")
    p.add_argument("out", help="checkpoint folder to write")
    p.set_defaults(func=cmd_convert_from_hf)
    p = add("consolidate", "stream a sharded (FSDP) checkpoint's weights into one model.safetensors", convert)
    p.add_argument("checkpoint", help="checkpoint or run folder")
    p.add_argument("--out", help="file to write (default: model.safetensors in the checkpoint)")
    p.set_defaults(func=cmd_convert_consolidate)
    p = add("to-hf", "write a model (any --adapter merged) as a Hugging Face folder for transformers", convert)
    _model_args(p, device=False)
    p.add_argument("out", help="folder to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights; default: as stored")
    p.set_defaults(func=cmd_convert_to_hf)
    p = add("to-gguf", "write a model as one GGUF file for llama.cpp, Ollama and LM Studio", convert)
    _model_args(p, device=False)
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--type", default="f32", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], help="weight type")
    p.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter of a fine-tuning run only")
    p.set_defaults(func=cmd_convert_to_gguf)
    p = add("from-gguf", "turn a GGUF file into a nomoat checkpoint (weights dequantized to fp32)", convert)
    p.add_argument("gguf_file", help="a .gguf file of a llama, qwen2, qwen3, gpt2 or gptneox model")
    p.add_argument("out", help="checkpoint folder to write")
    p.set_defaults(func=cmd_convert_from_gguf)
    p = add("quantize", "write a model as an int8 or int4 checkpoint, which loads as such (CPU inference)", convert)
    _model_args(p, device=False)
    p.add_argument("out", help="checkpoint folder to write")
    p.add_argument("--quantize", required=True, choices=["int8", "int4"], help="weight-only int8 or int4")
    p.set_defaults(func=cmd_convert_quantize)

    p = add("info", "a model's lineage: size, tokenizer, base model, data sources with licences and hashes")
    p.add_argument("model", help="checkpoint folder, run folder or Hugging Face folder")
    p.set_defaults(func=cmd_info)

    p = add("report", "a run's report card: lineage with hashes, data, losses, speed, evaluation, samples")
    p.add_argument("run", help="a `nomoat run` folder, or one `nomoat train` or `nomoat finetune` run folder")
    p.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nomoat", description="Build your own language model end to end.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    add = _adder(sub)
    _add_data_commands(sub, add)
    _add_training_commands(add)
    _add_inference_commands(add)
    _add_eval_command(add)
    _add_model_file_commands(sub, add)
    p = add("demo", "corpus -> tokenizer -> train -> eval -> sample on the bundled Shakespeare")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--section.key value` and `--section.key=value` out of argv for the config."""
    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in name:
            if "=" in arg:
                overrides[name] = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                overrides[name] = argv[i + 1]
                i += 1
            else:
                raise UserError(f"{arg} needs a value")
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:  # library warnings read as one line each, like errors, without a source excerpt
        warnings.formatwarning = lambda message, *args, **kwargs: f"nomoat: warning: {message}\n"
    try:
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        if args.func is cmd_train:
            return cmd_train(args, overrides, argv)
        if args.func is cmd_finetune:
            return cmd_finetune(args, overrides)
        if args.func is cmd_run:
            return cmd_run(args, overrides)
        if overrides:
            raise UserError(
                f"config overrides such as --{next(iter(overrides))} only apply to `nomoat train`, `finetune` and `run`"
            )
        return args.func(args) or 0  # the commands that can stop short (demo's Ctrl-C) return their status
    except UserError as e:
        if debug:
            raise
        rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"nomoat: error: {rank}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nomoat: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
