"""Parity with lm-evaluation-harness: the same tiny random model, exported to a Hugging Face folder, scored by the
harness's `hf` backend, by the harness through our registered `nomoat` model, and by `nomoat eval --task`, on the
same local JSONL file in each published format (the harness runs its own task YAML, pointed at that file)."""

import json
from pathlib import Path

import pytest
import torch
from conftest import SHAKESPEARE

from nomoat.checkpoint import load_checkpoint, save_checkpoint
from nomoat.config import ModelConfig, RunConfig
from nomoat.eval.tasks import evaluate_task, load_task
from nomoat.model import Transformer
from nomoat.tokenizer import train_tokenizer

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
import nomoat.eval.harness  # noqa: E402,F401  (registers the nomoat model type)

HARNESS_TASKS = Path(lm_eval.__file__).parent / "tasks"
N = 12  # items per task: enough that accuracies are not all 0 or 1 by chance


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(nomoat checkpoint, its Hugging Face export) of a random 2-layer LLaMA-style model."""
    root = tmp_path_factory.mktemp("harness")
    tok = train_tokenizer([SHAKESPEARE.read_text()[:100_000]], vocab_size=400)
    cfg = ModelConfig(
        vocab_size=400, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, max_seq_len=256, norm="rmsnorm",
        mlp="swiglu", pos_emb="rope", bias=False, tie_embeddings=False, init="normal", init_std=0.3,
    )  # fmt: skip
    torch.manual_seed(0)
    ckpt = save_checkpoint(root / "run", 0, Transformer(cfg), RunConfig(model=cfg), tok)
    from nomoat.convert import to_hf

    return ckpt, to_hf(load_checkpoint(ckpt), root / "hf")


def _lines(n: int, start: int = 0) -> list[str]:
    lines = [ln.strip() for ln in SHAKESPEARE.read_text()[:60_000].splitlines() if len(ln.split()) >= 5]
    return lines[start : start + n]


def _docs(fmt: str) -> list[dict]:
    """N items in the layout the harness's loader reads for each dataset, each layout from its own lines.

    (Shared lines would let a Winogrande and a LAMBADA request encode to the same tokens but for the split
    between context and continuation; the harness's HF backend then reuses one request's logits slice for the
    other, a quirk of its one-token-continuation cache that nomoat's scoring does not share.)"""
    formats = ["hellaswag", "arc", "piqa", "winogrande", "lambada"]
    text = _lines(6 * N, start=6 * N * formats.index(fmt))
    words = [t.split() for t in text]
    if fmt == "hellaswag":
        return [
            {
                "ind": i,
                "activity_label": "Reading",
                "ctx_a": text[i],
                "ctx_b": "then [title] he",
                "split": "val",
                "ctx": text[i],
                "endings": [text[N + 4 * i + j] + " [step]" for j in range(4)],
                "label": str(i % 4),
                "source_id": "x",
                "split_type": "indomain",
            }  # fmt: skip
            for i in range(N)
        ]
    if fmt == "arc":
        return [
            {
                "id": str(i),
                "question": text[i] + "?",
                "answerKey": "ABCD"[i % 4],
                "choices": {"text": [" ".join(words[N + 4 * i + j][:2]) for j in range(4)], "label": list("ABCD")},
            }  # fmt: skip
            for i in range(N)
        ]
    if fmt == "piqa":
        return [{"goal": text[i], "sol1": text[N + i], "sol2": text[2 * N + i], "label": i % 2} for i in range(N)]
    if fmt == "winogrande":
        return [
            {
                "sentence": " ".join(w[:2]) + " _ " + " ".join(w[3:]),
                "option1": w[2],
                "option2": words[N + i][0],
                "answer": "12"[i % 2],
            }  # fmt: skip
            for i, w in enumerate(words[:N])
        ]
    return [{"text": t} for t in text[:N]]  # lambada


# (our built-in task, data layout, the harness's YAML, its metrics)
CASES = [
    ("hellaswag", "hellaswag", "hellaswag/hellaswag.yaml", ("acc", "acc_norm")),
    ("arc_easy", "arc", "arc/arc_easy.yaml", ("acc", "acc_norm")),
    ("arc_challenge", "arc", "arc/arc_challenge.yaml", ("acc", "acc_norm")),
    ("piqa", "piqa", "piqa/piqa.yaml", ("acc", "acc_norm")),
    ("winogrande", "winogrande", "winogrande/default.yaml", ("acc",)),
    ("lambada", "lambada", "lambada/lambada_openai.yaml", ("acc", "perplexity")),
]


def _harness_task(root: Path, name: str, data: Path, yaml_file: str, shots: int) -> str:
    """A YAML that includes the harness's own definition and points it at the local file (only a test split)."""
    task = f"local_{name}_{shots}shot"
    (root / f"{task}.yaml").write_text(
        f"include: {HARNESS_TASKS / yaml_file}\ntask: {task}\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"training_split: null\nvalidation_split: null\ntest_split: test\nfewshot_split: test\nnum_fewshot: {shots}\n"
    )
    return task


@pytest.mark.slow
def test_acc_equals_harness_hf_backend_and_registered_model(models, tmp_path):
    """Zero-shot on every layout, 2-shot on the two multiple-choice layouts; one harness run per backend."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ckpt, hf = models
    runs = [(case, 0) for case in CASES] + [(CASES[1], 2), (CASES[3], 2)]
    tasks = {}
    for (name, fmt, yaml_file, _), shots in runs:
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in _docs(fmt)))
        tasks[name, shots] = _harness_task(tmp_path, name, data, yaml_file, shots)
    manager = TaskManager(include_path=str(tmp_path))  # indexing the harness's tasks is the slow part: once

    def harness(model: str, model_args: str) -> dict:
        kwargs = {"batch_size": 4, "device": "cpu", "task_manager": manager}
        out = simple_evaluate(model=model, model_args=model_args, tasks=list(tasks.values()), **kwargs)
        assert out["n-shot"][tasks["piqa", 2]] == 2
        return out["results"]

    theirs = harness("hf", f"pretrained={hf},dtype=float32")
    registered = harness("nomoat", f"pretrained={ckpt}")
    model = load_checkpoint(ckpt)
    for (name, _, _, metrics), shots in runs:
        ours = evaluate_task(model.model, model.tokenizer, load_task(name), tmp_path / f"{name}.jsonl", shots)
        for metric in metrics:
            ref = theirs[tasks[name, shots]][f"{metric},none"]
            assert ours[metric] == pytest.approx(ref, rel=1e-4), (name, shots, metric)
            assert registered[tasks[name, shots]][f"{metric},none"] == pytest.approx(ref, rel=1e-4), (name, metric)
    assert 0 < theirs[tasks["piqa", 0]]["acc,none"] < 1  # the data discriminates: not every answer right or wrong


def test_generate_until_stops_on_the_given_strings(models):
    from lm_eval.api.instance import Instance

    lm = nomoat.eval.harness.NomoatLM(pretrained=str(models[0]))
    free = lm.generate("ROMEO:", until=[], max_gen_toks=40)
    assert len(free) > 4
    stop = free[2:4]  # a string the free-running greedy text is known to reach
    requests = [
        Instance("generate_until", {}, ("ROMEO:", {"until": [stop], "max_gen_toks": 40, "do_sample": False}), 0),
        Instance("generate_until", {}, ("ROMEO:", {"until": ["\x00never"], "max_gen_toks": 5}), 1),
    ]
    cut, capped = lm.generate_until(requests, disable_tqdm=True)
    assert cut == free[: free.index(stop)] and stop not in cut
    assert lm.generate("ROMEO:", [], 5) == capped and len(capped) < len(free)  # max_gen_toks caps it


def test_loglikelihood_rolling_is_the_harness_window_split(models):
    from lm_eval.api.instance import Instance

    lm = nomoat.eval.harness.NomoatLM(pretrained=str(models[0]), max_length=32)
    text = " ".join(_lines(20))
    (ours,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    # the harness's own window split, scored request by request through our loglikelihood
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    windows = get_rolling_token_windows(lm.tok_encode(text), lm.eot_token_id, 32, 1)
    pairs = [make_disjoint_window(w) for w in windows]
    expected = sum(ll for ll, _ in lm._loglikelihood_tokens([(None, c, k) for c, k in pairs]))
    assert len(pairs) > 2 and ours == pytest.approx(expected, rel=1e-5)
