"""Task definitions and scoring: built-ins render the published layouts, shared-context scoring equals scoring each
request alone, few-shot draws are fixed by the seed, and bad task files fail naming the line."""

import json
from pathlib import Path

import pytest
import torch

from nomoat.config import ModelConfig
from nomoat.errors import UserError
from nomoat.eval.lm import score_requests
from nomoat.eval.tasks import builtin_tasks, encode_pair, evaluate_task, load_task, read_items
from nomoat.model import Transformer
from nomoat.tokenizer import train_tokenizer

HELLASWAG = {
    "activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "then [title] he",
    "endings": ["fries them [step] well.", "sings.", "sleeps  now.", "leaves."], "label": "2",
}  # fmt: skip
ARC = {"question": "What is hot?", "choices": {"text": ["ice", "fire"], "label": ["A", "B"]}, "answerKey": "B"}


@pytest.fixture(scope="module")
def lm() -> tuple[Transformer, object]:
    text = "The quick brown fox jumps over the lazy dog. " * 50 + "Question: Answer: what is hot fire ice"
    tok = train_tokenizer([text], vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=300, n_layer=2, n_head=2, d_model=32, d_ff=64, max_seq_len=48, norm="rmsnorm", mlp="swiglu",
        pos_emb="rope", bias=False, init="normal", init_std=0.3,
    )  # fmt: skip
    return Transformer(cfg).eval(), tok


def _write(path: Path, docs: list) -> Path:
    path.write_text("".join((d if isinstance(d, str) else json.dumps(d)) + "\n" for d in docs))
    return path


def test_builtins_render_the_harness_prompts(tmp_path):
    assert builtin_tasks() == ["arc_challenge", "arc_easy", "hellaswag", "lambada", "piqa", "winogrande"]
    (item,) = read_items(load_task("hellaswag"), _write(tmp_path / "h.jsonl", [HELLASWAG]))
    # the harness's preprocess: " [title]" -> ". ", other [brackets] dropped, double spaces closed, ctx_b capitalized
    assert item.requests[0] == ("Cooking: A man cuts onions. Then. he", " fries them well.")
    assert item.requests[2][1] == " sleeps now." and item.label == 2
    (item,) = read_items(load_task("arc_easy"), _write(tmp_path / "a.jsonl", [ARC]))
    assert item.requests == [("Question: What is hot?\nAnswer:", " ice"), ("Question: What is hot?\nAnswer:", " fire")]
    assert item.label == 1 and item.choice_lengths == [3, 4]
    wino = {"sentence": "The cup fell because _ was slippery.", "option1": "it", "option2": "he", "answer": "2"}
    (item,) = read_items(load_task("winogrande"), _write(tmp_path / "w.jsonl", [wino]))
    assert item.requests == [
        ("The cup fell because it", " was slippery."),
        ("The cup fell because he", " was slippery."),
    ]
    assert item.label == 1
    (item,) = read_items(load_task("lambada"), _write(tmp_path / "l.jsonl", [{"text": "a b c"}]))
    assert item.requests == [("a b", " c")]


@pytest.mark.parametrize("budget", [2048, 24])  # all in one batch; one context a batch
def test_shared_context_scoring_equals_one_request_at_a_time(lm, budget):
    model, tok = lm
    contexts = [tok.encode(t) for t in ("Question: what is hot? Answer:", "The lazy dog", "fox")]
    conts = [tok.encode(t) for t in (" fire", " ice and the lazy dog", " x")]
    requests = [(ctx, cont) for ctx in contexts for cont in conts]
    for (ctx, cont), (ll, greedy) in zip(requests, score_requests(model, requests, budget=budget), strict=True):
        logp = torch.log_softmax(model(torch.tensor([ctx + cont[:-1]]))[0, len(ctx) - 1 :], -1)
        expected = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        assert ll == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logp.argmax(-1) == torch.tensor(cont)).all())


def test_too_long_is_truncated_as_the_harness_does_or_refused(lm, tmp_path):
    model, tok = lm
    ctx, cont = tok.encode("the quick brown fox " * 12), tok.encode(" jumps")
    assert len(ctx) + len(cont) > 49
    (ll, _), (ll_cut, _) = score_requests(model, [(ctx, cont), (ctx[-(49 - len(cont)) :], cont)])
    assert ll == pytest.approx(ll_cut, abs=1e-4)  # (ctx + cont)[-(window + 1):][:-1] is what the model reads
    long = {**ARC, "question": "the quick brown fox " * 12}
    data = _write(tmp_path / "long.jsonl", [ARC, long])
    spec = load_task("arc_easy")
    assert evaluate_task(model, tok, spec, data)["truncated"] == 1
    assert evaluate_task(model, tok, spec, data, overflow="skip")["n"] == 1
    with pytest.raises(UserError, match=r"long.jsonl:2: .* window of 48"):
        evaluate_task(model, tok, spec, data, overflow="error")


def test_encode_pair_moves_trailing_spaces_and_empty_context_uses_eos(lm):
    _, tok = lm
    ctx, cont = encode_pair(tok, "the lazy ", "dog", tok.eos_id)
    assert ctx == tok.encode("the lazy") and ctx + cont == tok.encode("the lazy dog")
    assert encode_pair(tok, "", " dog", tok.eos_id) == ([tok.eos_id], tok.encode(" dog"))


def test_fewshot_is_fixed_by_the_seed_and_never_shows_the_item(lm, tmp_path):
    model, tok = lm
    docs = [{**ARC, "question": f"q{i}?", "answerKey": "AB"[i % 2]} for i in range(6)]
    data = _write(tmp_path / "arc.jsonl", docs)
    spec = load_task("arc_easy")
    items = read_items(spec, data)
    from nomoat.eval.tasks import fewshot_prefixes

    a = fewshot_prefixes(spec, items, items, 2, seed=1234, same=True)
    assert a == fewshot_prefixes(spec, items, items, 2, seed=1234, same=True)
    assert a != fewshot_prefixes(spec, items, items, 2, seed=1, same=True)
    for item, prefix in zip(items, a, strict=True):
        assert prefix.count("\n\n") == 2 and item.requests[0][0] not in prefix
    assert a[1].startswith("Question: ") and " Answer: " not in a[1]  # "Answer:" + " " + choice + "\n\n"
    result = evaluate_task(model, tok, spec, data, num_fewshot=2)
    assert result["n"] == 6 and result["num_fewshot"] == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"question": "q", "answerKey": "A"}, r"bad.jsonl:2: missing field .*'choices' is undefined"),
        ({**ARC, "answerKey": "E"}, r"bad.jsonl:2: does not fit task arc_easy .*ValueError"),
        ("{not json", r"bad.jsonl:2: not valid JSON"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, message):
    with pytest.raises(UserError, match=message):
        read_items(load_task("arc_easy"), _write(tmp_path / "bad.jsonl", [ARC, line]))


def test_out_of_range_label_and_empty_file_and_unknown_task(tmp_path):
    with pytest.raises(UserError, match=r"p.jsonl:1: label 2 is out of range for 2 choices"):
        piqa = {"goal": "g", "sol1": "a", "sol2": "b", "label": 2}
        read_items(load_task("piqa"), _write(tmp_path / "p.jsonl", [piqa]))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"empty.jsonl: no items \(empty file\)"):
        read_items(load_task("piqa"), tmp_path / "empty.jsonl")
    with pytest.raises(UserError, match=r"no such file or built-in task"):
        load_task("hellaswagg")


def test_a_task_file_is_data(lm, tmp_path):
    """A user-defined task: a TOML definition next to its data, no code."""
    model, tok = lm
    _write(tmp_path / "qa.jsonl", [{"q": "what is hot", "options": ["fire", "ice"], "gold": 0}])
    (tmp_path / "qa.toml").write_text(
        'name = "qa"\nkind = "multiple_choice"\ncontext = "Q: {{ q }}\\nA:"\nchoices = "options"\nlabel = "gold"\n'
        'metrics = ["acc", "acc_norm"]\ndata = "qa.jsonl"\n'
    )
    from nomoat.eval.tasks import parse_task_arg

    spec, data = parse_task_arg(str(tmp_path / "qa.toml"))
    assert data == tmp_path / "qa.jsonl"
    assert set(evaluate_task(model, tok, spec, data)) >= {"acc", "acc_norm", "n"}
    (tmp_path / "bad.toml").write_text('name = "x"\nkind = "multiple_choice"\ncontext = "c"\n')
    with pytest.raises(UserError, match="needs `choices`"):
        load_task(str(tmp_path / "bad.toml"))
