"""The report card and the model card, on a run folder made by really running the stages small: a recipe corpus
with a datasheet, a tokenizer, pretraining, LoRA SFT, a full fine-tune standing in for DPO (its metrics carry the
DPO columns), a hand-written eval/results.json and stage.json files, and the final model.

report.md is checked for its sections, hashes and accuracy table; report.html in headless Chromium (it renders,
every plot is visible, nothing is requested from anywhere but the file itself). The model card is read back with
huggingface_hub's own parser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomli_w
from conftest import SHAKESPEARE, tiny_run

from nomoat.card import hub_license, training_data, write_model_card
from nomoat.checkpoint import list_checkpoints
from nomoat.cli import main
from nomoat.config import FinetuneConfig, RunConfig, TrainConfig
from nomoat.data import build_corpus
from nomoat.files import file_sha256
from nomoat.finetune import finetune, merge
from nomoat.lineage import lineage
from nomoat.report import build_report
from nomoat.tokenizer import train_tokenizer
from nomoat.train import train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
CHATS = [("What colour is the sky?", "Blue."), ("Name a prime number.", "Seven."), ("Say hello.", "Hello there!")]
HOSTILE = "<script>alert(1)</script> a | pipe"  # a sample that must reach both files as text, never as markup
RESULTS = {
    "heldout": 8,
    "stages": {
        "base": {"tasks": {"capitals": 0.25, "chat_qa": 0.0}, "accuracy": 0.125, "val_bpb": 3.125},
        "sft": {
            "tasks": {"capitals": 0.5, "chat_qa": 0.75},
            "accuracy": 0.625,
            "val_bpb": 3.25,
            "vs_previous": {"stage": "base", "change": 0.5, "gained": 4, "lost": 0, "p_value": 0.125},
        },
        "dpo": {
            "tasks": {"capitals": 0.5, "chat_qa": 1.0},
            "accuracy": 0.75,
            "vs_previous": {"stage": "sft", "change": 0.125, "gained": 2, "lost": 1, "p_value": 1.0},
            "val_bpb": 3.375,
            "task_metrics": {"hellaswag/acc": 0.375, "hellaswag/acc_norm": 0.5},
        },
    },
    "samples": [
        {
            "stage": "sft",
            "messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hi"}],
        },
        {
            "stage": "dpo",
            "messages": [{"role": "user", "content": HOSTILE}, {"role": "assistant", "content": "```x"}],
            "expected": "Seven.",
        },
    ],
}


def write_corpus(root: Path, tokenizer: Path) -> Path:
    """A two-source recipe corpus (one source from the Hub, one local), through `build_corpus`."""
    words = SHAKESPEARE.read_text()[:200_000].split()
    for i in range(60):  # 150-word documents, ten words a line, long enough for the quality rules
        source = root / ("plays" if i < 30 else "sonnets")
        source.mkdir(exist_ok=True)
        chunk = words[i * 150 : (i + 1) * 150]
        (source / f"{i:02d}.txt").write_text("\n".join(" ".join(chunk[j : j + 10]) for j in range(0, 150, 10)))
    recipe = {
        "corpus": {"tokenizer": str(tokenizer), "val_fraction": 0.2},
        "source": [
            {"name": "plays", "path": "plays", "license": "CC-BY-SA 4.0",
             "url": "https://huggingface.co/datasets/karpathy/tiny_shakespeare"},
            {"name": "sonnets", "path": "sonnets", "license": "cc-by-sa-4.0"},
        ],
    }  # fmt: skip
    (root / "recipe.toml").write_text(tomli_w.dumps(recipe))
    build_corpus(root / "recipe.toml", root / "run" / "corpus" / "shards", progress=False)
    return root / "run" / "corpus" / "shards"


def ft_config(base: Path, data: Path, out: Path, method: str) -> RunConfig:
    train_cfg = {"out_dir": str(out), "steps": 4, "batch_size": 2, "seq_len": 48, "lr": 3e-3, "warmup_steps": 0}
    train_cfg |= {"eval_every": 0, "save_every": 0, "log_every": 1, "seed": 3, "dtype": "float32"}
    return RunConfig(
        train=TrainConfig(**train_cfg),  # type: ignore[arg-type]
        finetune=FinetuneConfig(base=str(base), data=str(data), method=method),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report")
    run = root / "run"
    (run / "tokenizer").mkdir(parents=True)
    text = [SHAKESPEARE.read_text()[:60_000]] + [f"{q} {a} user assistant" for q, a in CHATS] * 8
    tok = train_tokenizer(text, 320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(run / "tokenizer" / "tokenizer.json")
    corpus = write_corpus(root, run / "tokenizer" / "tokenizer.json")
    train(tiny_run((corpus, run / "tokenizer" / "tokenizer.json"), run / "pretrain", steps=6, eval_every=3,
                   save_every=0), progress=False)  # fmt: skip
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in CHATS))  # fmt: skip
    finetune(ft_config(run / "pretrain", chats, run / "sft", "lora"), progress=False)
    merge(run / "sft", run / "sft" / "merged")  # as `nomoat run` does: the next stage starts from whole weights
    finetune(ft_config(run / "sft" / "merged", chats, run / "dpo", "full"), progress=False)
    # the DPO trainer's columns, which its metrics rows carry beside the loss
    rows = [json.loads(line) for line in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if "loss" in r:
            r |= {"rewards/chosen": 0.1 * r["step"], "rewards/rejected": -0.1 * r["step"]}
            r |= {"rewards/margins": 0.2 * r["step"], "rewards/accuracies": 0.5}
    (run / "dpo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps(RESULTS))
    final = list_checkpoints(run / "dpo")[-1]
    shutil.copytree(final, run / "model", ignore=shutil.ignore_patterns("state", "trainer.pt"))
    for i, stage in enumerate(["corpus", "tokenizer", "pretrain", "sft", "dpo", "eval", "model"]):
        info = {"stage": stage, "fingerprint": f"{i:02d}" * 32, "inputs": {}, "wall_s": 12.5 + i,
                "finished": f"2025-01-01T00:00:0{i}+00:00", "outputs": {}}  # fmt: skip
        (run / stage / "stage.json").write_text(json.dumps(info))
    return run


def weights(stage: Path) -> Path:
    found = list_checkpoints(stage)
    folder = found[-1] if found else stage
    return next(folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file())


def test_report_md_has_the_chain_the_stages_and_the_scores(run: Path) -> None:
    md_path, html_path = build_report(run)
    assert (md_path, html_path) == (run / "report.md", run / "report.html")
    md = md_path.read_text()
    sections = ["## Lineage", "## Stage: corpus", "## Stage: tokenizer", "## Stage: pretrain", "## Stage: sft",
                "## Stage: dpo", "## Evaluation across stages", "## Final model"]  # fmt: skip
    assert [md.index(s) for s in sections] == sorted(md.index(s) for s in sections)
    # the chain, in order, each link with the hash of the file it produced
    chain = md[md.index("## Lineage") : md.index("## Stage: corpus")]
    files = [run / "tokenizer" / "tokenizer.json", run / "corpus" / "shards" / "manifest.json",
             weights(run / "pretrain"), weights(run / "sft"), run / "sft" / "merged" / "model.safetensors",
             weights(run / "dpo"), run / "model" / "model.safetensors"]  # fmt: skip
    hashes = [file_sha256(f) for f in files]
    assert [chain.index(h) for h in hashes] == sorted(chain.index(h) for h in hashes)
    assert weights(run / "sft").name == "adapter_model.safetensors"  # the LoRA stage's own artefact
    assert hashes[5] == hashes[6]  # the final model is the DPO stage's weights
    assert (
        f"| dpo | `dpo/checkpoints/step_00000004/model.safetensors` | `{hashes[5]}` | from {run}/sft/merged |" in chain
    )
    # the data of each stage: the corpus sources with their licences, the SFT chats file
    corpus = md[md.index("## Stage: corpus") : md.index("## Stage: tokenizer")]
    assert "| plays | CC-BY-SA 4.0 |" in corpus and "| sonnets | cc-by-sa-4.0 |" in corpus
    assert (
        "https://huggingface.co/datasets/karpathy/tiny_shakespeare" in corpus and "corpus/shards/mixture.png" in corpus
    )
    pretrain = md[md.index("## Stage: pretrain") : md.index("## Stage: sft")]
    params = lineage(run / "pretrain")["model"]["parameters"]
    assert f"| parameters | {params:,} (2 layers x 32) |" in pretrain and "| plays | CC-BY-SA 4.0 |" in pretrain
    assert "wall time 14.5 s" in pretrain and "final validation bits per byte" in pretrain
    assert "![pretrain: loss curves against steps and against time](pretrain/loss.png)" in pretrain
    sft = md[md.index("## Stage: sft") : md.index("## Stage: dpo")]
    assert "| chats.jsonl | not recorded |" in sft and "| method | lora |" in sft and "adapter parameters" in sft
    dpo = md[md.index("## Stage: dpo") : md.index("## Evaluation across stages")]
    assert "| rewards/margins | 0.8000 |" in dpo  # the last step's
    # each stage's scores, and the table across stages
    header = "| stage | bits per byte | capitals | chat_qa | mean accuracy | change (McNemar p) | hellaswag/acc |"
    assert header in md
    table, sections = md[md.index("## Evaluation across stages") :], md[: md.index("## Evaluation across stages")]
    for row, own in (
        ("| base | 3.1250 | 0.2500 | 0.0000 | 0.1250 | – | – | – |", "| base | 3.1250 | 0.2500 | 0.0000 | 0.1250 |"),
        ("| sft | 3.2500 | 0.5000 | 0.7500 | 0.6250 | +50.0 points vs base (p = 0.12) | – | – |",
         "| sft | 3.2500 | 0.5000 | 0.7500 | 0.6250 | +50.0 points vs base (p = 0.12) |"),
        ("| dpo | 3.3750 | 0.5000 | 1.0000 | 0.7500 | +12.5 points vs sft (p = 1) | 0.3750 | 0.5000 |",
         "| dpo | 3.3750 | 0.5000 | 1.0000 | 0.7500 | +12.5 points vs sft (p = 1) | 0.3750 | 0.5000 |"),
    ):  # fmt: skip
        assert row in table and own + "\n" in sections  # also in its own stage's section, with its columns only
    assert "exact match, on 8 held-out items" in table and "McNemar test's p-value" in table
    # samples in their stage's section, escaped: no markup, and no code fence the text could close
    assert "```text\nSay hello.\n```" in sft and f"```text\n{HOSTILE}\n```" in dpo  # fenced: shown, never run
    assert "````text\n```x\n````" in dpo and md.count("<script") == 1 and "(expected: Seven.)" in dpo


@pytest.mark.slow  # Chromium
def test_report_html_renders_offline_with_every_plot(run: Path, browser) -> None:
    _, html_path = build_report(run)
    page = html_path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)  # no external resource at all
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    requests = page_requests(browser, html_path)
    assert requests and all(url.startswith(("file://", "data:")) for url in requests), requests
    images = browser.execute_script("return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert len(images) == 4 and all(done and width > 0 for done, width in images)  # 3 stages' curves + mixture
    headings = [h.text for h in browser.find_elements("css selector", "h2")]
    assert headings[:2] == ["Lineage", "Stage: corpus"] and "Final model" in headings
    cells = browser.execute_script("return [...document.querySelectorAll('td')].map(td => td.textContent)")
    assert file_sha256(run / "model" / "model.safetensors") in cells
    assert HOSTILE in browser.find_elements("css selector", ".chat")[-1].text  # shown as text


@pytest.mark.slow  # Chromium
def test_the_network_check_sees_a_request_that_leaves(tmp_path: Path, browser) -> None:
    """The check above can fail: a page that loads an image from a server is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/x.png"></body></html>')
    assert any(url.startswith("http://127.0.0.1:9/") for url in page_requests(browser, page))


def test_report_of_single_runs(run: Path, tmp_path: Path) -> None:
    """A lone `nomoat train` folder and a lone `nomoat finetune` folder get a report of their own."""
    pretrain, sft = tmp_path / "pretrain", tmp_path / "sft"
    shutil.copytree(run / "pretrain", pretrain)
    md = build_report(pretrain)[0].read_text()
    assert "## Stage: pretrain" in md and "## Stage: corpus" not in md and "## Evaluation" not in md
    assert file_sha256(weights(pretrain)) in md and "| plays | CC-BY-SA 4.0 |" in md
    assert "![pretrain: loss curves against steps and against time](loss.png)" in md
    shutil.copytree(run / "sft", sft)
    md = build_report(sft)[0].read_text()
    chain = md[md.index("## Lineage") : md.index("## Stage: finetune")]
    assert file_sha256(weights(run / "pretrain")) in chain  # the base it records, found and hashed
    assert file_sha256(weights(sft)) in chain and "chats.jsonl" in chain
    assert (sft / "report.html").is_file() and "data:image/png;base64," in (sft / "report.html").read_text()


def test_report_cli_and_its_errors(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert out == {"markdown": str(run / "report.md"), "html": str(run / "report.html")}
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.strip() == f"nomoat: error: {tmp_path / 'nowhere'}: no such run folder"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "nothing to report" in capsys.readouterr().err
    bad = tmp_path / "bad"
    shutil.copytree(run / "eval", bad / "eval")
    (bad / "eval" / "results.json").write_text(json.dumps({"stages": {"base": {"tasks": [0.5]}}}))
    assert main(["report", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "results.json" in err and '"base"' in err
    assert not (bad / "report.md").exists()  # nothing half-written


def load_card(path: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_model_card_of_the_final_model(run: Path) -> None:
    path = write_model_card(run / "model", run / "model", evals=RESULTS["stages"]["dpo"], name="tiny-chat")
    card = load_card(path)
    data = card.data
    assert data.pipeline_tag == "text-generation" and data.library_name == "nomoat"
    assert data.base_model == str(run / "sft" / "merged") and data.base_model_relation == "finetune"
    assert "nomoat" in data.tags and "llama" in data.tags and "full" in data.tags
    # the data of the whole chain: the corpus (through the bases) and the chats; the chats' licence is unknown
    assert data.datasets == ["karpathy/tiny_shakespeare", "sonnets", "chats.jsonl"]
    assert data.license == "unknown"
    assert data.model_name == "tiny-chat"
    found = {(r.dataset_name, r.metric_type): r.metric_value for r in data.eval_results}
    assert found == {("validation split", "bits_per_byte"): 3.375, ("capitals", "accuracy"): 0.5,
                     ("chat_qa", "accuracy"): 1.0, ("hellaswag", "accuracy"): 0.375,
                     ("hellaswag", "acc_norm"): 0.5}  # fmt: skip
    assert "| pretraining | plays |" in card.text and "| fine-tuning (full) | chats.jsonl |" in card.text
    chosen = load_card(write_model_card(run / "model", run / "model", license="apache-2.0", base_model="me/tiny"))
    assert chosen.data.license == "apache-2.0" and chosen.data.base_model == "me/tiny"
    assert chosen.data.eval_results is None  # no evaluation given, no model-index


def test_to_hf_writes_the_model_card(run: Path, tmp_path: Path) -> None:
    assert main(["convert", "to-hf", str(run / "pretrain"), str(tmp_path / "hf")]) == 0
    card = load_card(tmp_path / "hf" / "README.md")
    assert card.data.license == "cc-by-sa-4.0"  # both sources' licence, as the Hub names it
    assert card.data.datasets == ["karpathy/tiny_shakespeare", "sonnets"]
    assert card.data.library_name == "transformers" and card.data.base_model is None
    assert f"{lineage(run / 'pretrain')['model']['parameters']:,}" in card.text
    # a Hugging Face folder passed through keeps its own card, which knows more than a lineage starting there
    assert main(["convert", "to-hf", str(tmp_path / "hf"), str(tmp_path / "hf_again")]) == 0
    assert (tmp_path / "hf_again" / "README.md").read_text() == (tmp_path / "hf" / "README.md").read_text()
    # a LoRA run exported with its adapter merged: the card is the fine-tune's, with its base
    assert main(["convert", "to-hf", str(run / "sft"), str(tmp_path / "hf_sft")]) == 0
    card = load_card(tmp_path / "hf_sft" / "README.md")
    assert card.data.base_model == str(run / "pretrain") and "lora" in card.data.tags
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tmp_path / "hf_sft").model_type == "llama"  # still a loadable folder


def test_licences_as_the_hub_names_them(run: Path) -> None:
    assert hub_license(["CC-BY-SA 4.0", "cc-by-sa-4.0"]) == ("cc-by-sa-4.0", None)
    assert hub_license(["Apache 2.0"]) == ("apache-2.0", None)
    assert hub_license(["public domain (the plays)"]) == ("other", "public-domain")
    assert hub_license(["mit", "apache-2.0"]) == ("other", "mixed")
    assert hub_license(["mit", None]) == ("unknown", None)
    assert [s["stage"] for s in training_data(lineage(run / "sft"))] == ["pretraining"] * 2 + ["fine-tuning (lora)"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("needs Chromium: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def page_requests(browser, path: Path) -> list[str]:
    """Every URL the page asked for while loading, from Chrome's network log (DevTools Network events)."""
    browser.get_log("performance")  # drop what earlier pages logged
    browser.get(path.resolve().as_uri())
    browser.execute_script("return document.readyState")
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_report_command_runs_in_a_fresh_process(run: Path) -> None:
    """`nomoat report` as a user runs it: the two paths on stderr, exit 0."""
    proc = subprocess.run([sys.executable, "-m", "nomoat.cli", "report", str(run)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr.split() == [str(run / "report.md"), str(run / "report.html")]


def test_report_of_a_run_whose_tokenizer_stage_built_the_shards(run: Path, shakespeare_shards, tmp_path: Path) -> None:
    """`nomoat run` on text files: corpus/ holds the text, tokenizer/shards/ the shards and their datasheet."""
    from nomoat.data import load_manifest, write_source_datasheet

    text = tmp_path / "run" / "corpus"
    text.mkdir(parents=True)
    (text / "train.txt").write_text("To be, or not to be.\n")
    (text / "val.txt").write_text("That is the question.\n")
    shards = tmp_path / "run" / "tokenizer" / "shards"
    shutil.copytree(shakespeare_shards[0], shards)
    shutil.copy(shakespeare_shards[1], shards.parent / "tokenizer.json")
    write_source_datasheet(shards, load_manifest(shards), {"name": "bard", "license": "public domain", "url": ""})
    shutil.copytree(run / "pretrain", tmp_path / "run" / "pretrain")
    md = build_report(tmp_path / "run")[0].read_text()
    chain = md[md.index("## Lineage") : md.index("## Stage: corpus")]
    for name in ("corpus/train.txt", "corpus/val.txt", "tokenizer/tokenizer.json", "tokenizer/shards/manifest.json"):
        assert f"`{name}` | `{file_sha256(tmp_path / 'run' / name)}` |" in chain
    assert "sources: bard" in chain and "| bard | public domain |" in md[md.index("## Stage: corpus") :]
