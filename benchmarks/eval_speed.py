"""Multiple-choice scoring speed: `nomoat eval --task` against lm-evaluation-harness's HF backend, same weights.

A LLaMA-style ~125M model (12 x 768, SwiGLU, RoPE, GQA, 32k vocabulary) with random weights is exported to a
Hugging Face folder; both sides score the same HellaSwag-layout items (built from the bundled Shakespeare: a
three-line context, four one-line endings) on the CPU in fp32, in one process, and must agree on acc and acc_norm.
Timed: everything from the task's file to the metrics (nomoat before and after the harness, averaged, so that
load drifting on a shared machine hits both); not timed: loading each model, one warm-up forward, indexing the
harness's tasks.
Usage: `python benchmarks/eval_speed.py [--items 500] [--hf-batch-size 16] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from nomoat.checkpoint import load_checkpoint, save_checkpoint
from nomoat.config import RunConfig, TrainConfig, load_config
from nomoat.convert import to_hf
from nomoat.eval.tasks import evaluate_task, load_task
from nomoat.model import Transformer
from nomoat.tokenizer import train_tokenizer

SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"
LLAMA = load_config("llama-125m").model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--hf-batch-size", type=int, default=16, help="the harness's batch_size for its HF backend")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's choice")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def hellaswag_items(n: int) -> list[dict]:
    lines = [ln.strip() for ln in SHAKESPEARE.read_text().splitlines() if len(ln.split()) >= 4]
    return [
        {
            "ind": i,
            "activity_label": "Drama",
            "ctx_a": " ".join(lines[7 * i : 7 * i + 2]),
            "ctx_b": lines[7 * i + 2],
            "endings": lines[7 * i + 3 : 7 * i + 7],
            "label": str(i % 4),
            "split": "val",
            "split_type": "indomain",
            "ctx": "",
            "source_id": "shakespeare",
        }  # fmt: skip
        for i in range(n)
    ]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lm_eval
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    root = Path(tempfile.mkdtemp(prefix="eval_speed-"))
    tok = train_tokenizer([SHAKESPEARE.read_text()], vocab_size=8192)
    torch.manual_seed(0)
    model = Transformer(LLAMA)
    ckpt = save_checkpoint(root / "run", 0, model, RunConfig(model=LLAMA, train=TrainConfig(seq_len=256)), tok)
    hf_dir = to_hf(load_checkpoint(ckpt), root / "hf")
    data = root / "hellaswag.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in hellaswag_items(args.items)))
    harness_yaml = Path(lm_eval.__file__).parent / "tasks/hellaswag/hellaswag.yaml"
    (root / "bench_hellaswag.yaml").write_text(
        f"include: {harness_yaml}\ntask: bench_hellaswag\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n"
    )
    threads = torch.get_num_threads()
    print(f"{model.num_params() / 1e6:.0f}M parameters, {args.items} items x 4 endings, {threads} threads")

    ours_model = load_checkpoint(ckpt)
    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=args.hf_batch_size)
    warm = torch.randint(0, tok.vocab_size, (4, 64))
    with torch.no_grad():  # one untimed forward each: weights paged in, kernels chosen
        ours_model.model(warm), lm.model(warm)

    def run_ours() -> tuple[dict[str, float], float]:
        start = time.perf_counter()
        result = evaluate_task(ours_model.model, ours_model.tokenizer, load_task("hellaswag"), data)
        return result, time.perf_counter() - start

    ours, t_before = run_ours()
    print(f"nomoat: {t_before:.1f} s, acc {ours['acc']:.4f}, acc_norm {ours['acc_norm']:.4f}", flush=True)

    manager = TaskManager(include_path=str(root))
    start = time.perf_counter()
    out = simple_evaluate(model=lm, tasks=["bench_hellaswag"], task_manager=manager, verbosity="ERROR")
    t_hf = time.perf_counter() - start
    theirs = out["results"]["bench_hellaswag"]
    print(f"harness hf (batch {args.hf_batch_size}): {t_hf:.1f} s, acc {theirs['acc,none']:.4f}, "
          f"acc_norm {theirs['acc_norm,none']:.4f}")  # fmt: skip

    _, t_after = run_ours()  # nomoat timed before and after the harness: load drifting on a shared machine
    t_ours = (t_before + t_after) / 2
    print(f"nomoat again: {t_after:.1f} s; mean {t_ours:.1f} s")
    same = ours["acc"] == theirs["acc,none"] and ours["acc_norm"] == theirs["acc_norm,none"]
    print(f"speed-up: {t_hf / t_ours:.2f}x; accuracies identical: {same}")
    if args.json:
        summary = {"items": args.items, "nomoat_s": t_ours, "harness_hf_s": t_hf, "ratio": t_hf / t_ours}
        print(json.dumps(summary | {"identical": same, "acc": ours["acc"], "acc_norm": ours["acc_norm"]}))


if __name__ == "__main__":
    main()
