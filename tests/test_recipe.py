"""Tests for nomoat/data/recipe.py: a two-source recipe with planted duplicates, an eval leak and mixture weights."""

import gzip
import hashlib
import json
import sys
from pathlib import Path

import pytest
import tomli_w
import zstandard

from nomoat.cli import main
from nomoat.data import build_corpus, load_manifest, load_recipe
from nomoat.data.formats import read_corpus_file
from nomoat.errors import UserError
from nomoat.tokenizer import train_tokenizer

SHAKESPEARE = Path(__file__).parents[1] / "nomoat/assets/tinyshakespeare.txt"
WORDS = SHAKESPEARE.read_text()[:200_000].split()
# 150-word documents, ten words a line: long enough for Gopher's rules, without repeated speaker-name lines.
CHUNKS = [
    "\n".join(" ".join(WORDS[k + j : k + j + 10]) for j in range(0, 150, 10)) + "\n" for k in range(0, 150 * 60, 150)
]
GUTENBERG = {"pile_set_name": "Gutenberg (PG-19)"}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sources: plays/ (20 chunks, an exact and a near copy of its own, a short doc) and pile.jsonl.zst (20
    Gutenberg chunks, one a copy of a play, one leaking an eval passage, and 5 Pile-CC docs to filter out)."""
    root = tmp_path_factory.mktemp("recipe")
    train_tokenizer([SHAKESPEARE.read_text()[:100_000]], vocab_size=300).save(root / "tokenizer.json")
    plays = root / "plays"
    plays.mkdir()
    for i in range(20):
        (plays / f"{i:02d}.txt").write_text(CHUNKS[i])
    (plays / "z_exact.txt").write_text("  " + CHUNKS[0].upper().replace("\n", " \n "))
    words = CHUNKS[1].split(" ")
    words[70] = "zounds"
    (plays / "z_near.txt").write_text(" ".join(words))
    (plays / "z_short.txt").write_text("Too short to be a document.\n")
    records = [{"text": c, "meta": GUTENBERG} for c in CHUNKS[20:39]]
    records += [{"text": CHUNKS[2], "meta": GUTENBERG}, {"text": CHUNKS[39], "meta": GUTENBERG}]
    records += [{"text": c, "meta": {"pile_set_name": "Pile-CC"}} for c in CHUNKS[40:45]]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (root / "pile.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    leak = " ".join(CHUNKS[39].split()[40:60])
    (root / "eval.jsonl").write_text(json.dumps({"text": leak}) + "\n" + json.dumps({"text": CHUNKS[50]}) + "\n")
    return root


def write_recipe(root: Path, name: str = "recipe.toml", weights: tuple[float, float] = (1, 1), **sections) -> Path:
    recipe = {
        "corpus": {"tokenizer": "tokenizer.json", "val_fraction": 0.0, "seed": 0},
        "decontaminate": {"eval_files": ["eval.jsonl"], "n": 13},
        "source": [
            {"name": "plays", "path": "plays", "weight": weights[0], "license": "public domain"},
            {
                "name": "pile",
                "path": "pile*.jsonl.zst",
                "meta_filter": {"meta.pile_set_name": "Gutenberg (PG-19)"},
                "weight": weights[1],
                "url": "https://pile.eleuther.ai",
            },
        ],
    } | sections
    path = root / name
    path.write_text(tomli_w.dumps(recipe))
    return path


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def built(root: Path) -> Path:
    build_corpus(write_recipe(root), root / "out", progress=False)
    return root / "out"


def test_datasheet_counts_every_drop(built: Path) -> None:
    sheet = json.loads((built / "datasheet.json").read_text())
    plays, pile = sheet["sources"]
    assert plays["documents_in"] == 23 and pile["documents_in"] == 26
    assert plays["filter_drops"] == {"min_words": 1}
    assert plays["exact_duplicates"] == 1 and plays["near_duplicates"] == 1
    assert pile["exact_duplicates"] == 1  # a copy of a play: the earlier source keeps it
    assert pile["meta_filtered"] == 5
    assert pile["contaminated"] == 1 and list(pile["contaminated_by"]) == [f"{built.parent / 'eval.jsonl'}:1"]
    assert plays["unique_documents_out"] == plays["documents_out"] == 20
    assert pile["documents_out"] == 19
    assert plays["license"] == "public domain" and pile["url"] == "https://pile.eleuther.ai"
    assert [f["path"] for f in pile["files"]] == ["pile.jsonl.zst"] and len(plays["files"]) == 23
    m = load_manifest(built)
    assert [i["tokens"] for i in m["inputs"]] == [plays["tokens_out"], pile["tokens_out"]]
    assert m["splits"]["train"]["tokens"] == plays["tokens_out"] + pile["tokens_out"]
    md = (built / "datasheet.md").read_text()
    assert "| plays |" in md and "exact_duplicates 1" in md and "eval.jsonl:1 (1)" in md
    assert (built / "mixture.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_is_byte_identical(root: Path, built: Path) -> None:
    build_corpus(write_recipe(root), root / "again", progress=False)
    assert file_hashes(root / "again") == file_hashes(built)


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_count_does_not_change_the_output(root: Path, built: Path, workers: int) -> None:
    corpus = {"tokenizer": "tokenizer.json", "val_fraction": 0.0, "seed": 0, "workers": workers}
    out = root / f"w{workers}"
    build_corpus(write_recipe(root, f"w{workers}.toml", corpus=corpus), out, progress=False)
    ours, reference = file_hashes(out), file_hashes(built)
    sheets = [json.loads((d / "datasheet.json").read_text()) for d in (out, built)]
    for sheet in sheets:
        sheet.pop("recipe_sha256"), sheet.pop("fingerprint")  # the recipes differ by their `workers` line alone
    assert sheets[0] == sheets[1]
    for name in ("datasheet.json", "datasheet.md"):
        ours.pop(name), reference.pop(name)
    assert ours == reference


def test_weights_repeat_documents(root: Path, built: Path) -> None:
    sheet = build_corpus(write_recipe(root, "w.toml", weights=(2, 0.5)), root / "weighted", progress=False)
    base = json.loads((built / "datasheet.json").read_text())["sources"]
    plays, pile = sheet["sources"]
    assert plays["tokens_out"] == 2 * base[0]["tokens_out"] and plays["documents_out"] == 40
    assert 0.2 * base[1]["tokens_out"] < pile["tokens_out"] < 0.8 * base[1]["tokens_out"]
    assert pile["unique_documents_out"] == 19 and pile["documents_out"] < 19
    md = (root / "weighted/datasheet.md").read_text()  # 40 docs out of 23 in, explained
    assert "| plays | 2 | 23 | 40 |" in md and "weight 2: twice" in md
    assert "- kept 20 distinct documents; weight 2 makes them 40" in md


def test_clean_options_and_false_for_none(root: Path) -> None:
    clean = {"max_dup_line_fraction": False, "mean_word_length": [2, 12], "max_top_ngram": [[2, 0.3]]}
    recipe = load_recipe(write_recipe(root, "opts.toml", clean=clean | {"strip_gutenberg": True}))
    assert recipe.clean.max_dup_line_fraction is None and recipe.strip_gutenberg
    assert recipe.clean.mean_word_length == (2.0, 12.0) and recipe.clean.max_top_ngram == ((2, 0.3),)
    assert (
        recipe.dedup is not None
        and load_recipe(write_recipe(root, "opts.toml", dedup={"enabled": False})).dedup is None
    )


def test_recipe_errors(root: Path) -> None:
    with pytest.raises(UserError, match="did you mean 'clean.min_words'"):
        load_recipe(write_recipe(root, "bad.toml", clean={"min_word": 10}))
    with pytest.raises(UserError, match="did you mean 'source'"):
        load_recipe(write_recipe(root, "bad.toml", sources=[]))
    with pytest.raises(UserError, match=r"\[corpus\] needs tokenizer"):
        load_recipe(write_recipe(root, "bad.toml", corpus={"seed": 1}))
    with pytest.raises(UserError, match="weight must be > 0"):
        load_recipe(write_recipe(root, "bad.toml", weights=(1, 0)))
    with pytest.raises(UserError, match="'csv' is not one of"):
        load_recipe(write_recipe(root, "bad.toml", source=[{"name": "a", "path": "x", "format": "csv"}]))
    with pytest.raises(UserError, match=r"\[source\] needs path"):
        load_recipe(write_recipe(root, "bad.toml", source=[{"name": "a"}]))
    with pytest.raises(UserError, match="mean_word_length: expected an array of 2 items"):
        load_recipe(write_recipe(root, "bad.toml", clean={"mean_word_length": [3]}))
    with pytest.raises(UserError, match="no such file or folder"):
        build_corpus(write_recipe(root, "bad.toml", source=[{"name": "a", "path": "nope"}]), root / "o", progress=False)
    with pytest.raises(UserError, match="matches no corpus files"):
        build_corpus(
            write_recipe(root, "bad.toml", source=[{"name": "a", "path": "*.nope"}]), root / "o", progress=False
        )
    with pytest.raises(UserError, match="no document survives.*plays: 23 documents in, dropped: min_words 23"):
        build_corpus(write_recipe(root, "bad.toml", clean={"min_words": 5000}), root / "o", progress=False)
    assert not (root / "o").exists()


def test_bad_json_lines_are_counted_unless_strict(root: Path, capsys: pytest.CaptureFixture) -> None:
    lines = [json.dumps({"text": c}) for c in CHUNKS[45:48]]
    (root / "broken.jsonl").write_text("\n".join([lines[0], '{"text": "cut off', *lines[1:]]) + "\n")
    recipe = write_recipe(root, "broken.toml", source=[{"name": "broken", "path": "broken.jsonl", "weight": 1}])
    with pytest.raises(UserError, match=r"broken.jsonl:2: not valid JSON"):
        build_corpus(recipe, root / "broken_strict", progress=False, strict=True)
    capsys.readouterr()
    (source,) = build_corpus(recipe, root / "broken", progress=False)["sources"]
    assert source["bad_lines"] == 1 and source["documents_out"] == 3
    assert f"{root / 'broken.jsonl'}:2: not valid JSON" in capsys.readouterr().err
    assert "did not parse, skipped: 1" in (root / "broken" / "datasheet.md").read_text()


def test_every_format_through_a_recipe(root: Path) -> None:
    """txt and jsonl.zst are the fixture's sources; here jsonl, jsonl.gz and parquet, each with a meta_filter."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    (root / "formats").mkdir()
    records = [{"body": c, "meta": {"keep": k < 3}} for k, c in enumerate(CHUNKS[55:59])]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (root / "formats/a.jsonl").write_text(lines)
    (root / "formats/a.jsonl.gz").write_bytes(gzip.compress(lines.replace("body", "text").encode()))
    pq.write_table(pa.Table.from_pylist(records), root / "formats/a.parquet")
    sources = [
        {"name": f, "path": f"formats/a.{f}", "text_field": "text" if f == "jsonl.gz" else "body"}
        | {"meta_filter": {"meta.keep": True}}
        for f in ("jsonl", "jsonl.gz", "parquet")
    ]
    sheet = build_corpus(
        write_recipe(root, "formats.toml", source=sources, dedup={"enabled": False}), root / "f", progress=False
    )
    assert [(s["documents_in"], s["meta_filtered"], s["documents_out"]) for s in sheet["sources"]] == [(4, 1, 3)] * 3
    assert len({s["tokens_out"] for s in sheet["sources"]}) == 1  # the same three documents from each format


def test_parquet_and_ray_need_their_extras(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (root / "a.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were not installed
    with pytest.raises(UserError, match=r"a.parquet: reading parquet needs pyarrow; pip install 'nomoat\[parquet\]'"):
        list(read_corpus_file(root / "a.parquet"))
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=r"--engine ray needs Ray; pip install 'nomoat\[ray\]'"):
        build_corpus(write_recipe(root, "noray.toml"), root / "noray", progress=False, engine="ray")
    assert not (root / "noray").exists()


def test_jsonl_gz_and_text_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"body": "hello", "id": 1}\n'))
    assert [r for r, _ in read_corpus_file(path, text_field="body")] == [{"body": "hello", "id": 1}]
    with pytest.raises(UserError, match='a.jsonl.gz:1: expected an object with a string "text"'):
        list(read_corpus_file(path))


def test_cli_bad_recipe_is_one_line(root: Path, capsys: pytest.CaptureFixture) -> None:
    recipe = write_recipe(root, "bad.toml", corpus={"tokenizer": "tokenizer.json", "sed": 1})
    assert main(["data", "build", str(recipe), "--out", str(root / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "did you mean 'corpus.seed'" in err


def test_rerun_skips_finished_work_until_an_input_changes(root: Path, tmp_path: Path) -> None:
    recipe = write_recipe(root, "skip.toml")
    out = tmp_path / "out"
    first = build_corpus(recipe, out, progress=False)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert build_corpus(recipe, out, progress=False) == first | {"skipped": True}
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # nothing was rewritten
    build_corpus(recipe, out, progress=False, force=True)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp
    stamp = (out / "manifest.json").stat().st_mtime_ns
    (root / "eval.jsonl").write_text((root / "eval.jsonl").read_text() + json.dumps({"text": "new item"}) + "\n")
    try:
        build_corpus(recipe, out, progress=False)  # an eval file changed: the fingerprint differs
        assert (out / "manifest.json").stat().st_mtime_ns != stamp
    finally:
        (root / "eval.jsonl").write_text("".join((root / "eval.jsonl").read_text().splitlines(keepends=True)[:-1]))


def _spawned_workers(pid: int) -> int:
    """How many of pid's child processes are multiprocessing's spawned workers (Linux /proc)."""
    found = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        found += ppid == pid and b"spawn_main" in cmdline
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads child processes from /proc")
def test_ctrl_c_stops_a_recipe_build_with_one_line_and_no_worker_tracebacks(root: Path, tmp_path: Path) -> None:
    """Ctrl-C reaches the terminal's whole process group: the workers ignore it, the parent stops with one line,
    exit 130, and no `Process SpawnPoolWorker-1:` traceback."""
    import os
    import signal
    import subprocess
    import time

    big = tmp_path / "big"
    big.mkdir()
    docs = [f"document {i}\n{CHUNKS[i % len(CHUNKS)]}" for i in range(6000)]
    (big / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "tokenizer.json").write_bytes((root / "tokenizer.json").read_bytes())
    recipe = {
        "corpus": {"tokenizer": "tokenizer.json", "val_fraction": 0.0, "workers": 2},
        "source": [{"name": "big", "path": "big", "license": "public domain"}],
    }
    (tmp_path / "big.toml").write_text(tomli_w.dumps(recipe))
    command = [sys.executable, "-m", "nomoat.cli", "data", "build", str(tmp_path / "big.toml"), "--out"]
    proc = subprocess.Popen([*command, str(tmp_path / "out")], stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and _spawned_workers(proc.pid) < 2:
        time.sleep(0.05)
    time.sleep(0.5)  # the workers at work, past their start-up
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # as the terminal sends Ctrl-C: to every process of the group
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the build finished before the signal arrived")
    assert proc.returncode == 130, err
    assert "SpawnPoolWorker" not in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "nomoat: interrupted"
    assert not (tmp_path / "out").exists()


def test_cli_says_an_unchanged_rerun_skipped_the_build(root: Path, tmp_path: Path, capsys) -> None:
    recipe, out = write_recipe(root, "said.toml"), tmp_path / "out"
    assert main(["data", "build", str(recipe), "--out", str(out), "--json"]) == 0
    first = capsys.readouterr()
    assert "skipped" not in first.err and json.loads(first.out.splitlines()[-1])["skipped"] is False
    assert main(["data", "build", str(recipe), "--out", str(out), "--json"]) == 0
    again = capsys.readouterr()
    assert again.err.strip().splitlines()[-1].startswith(f"skipped the build: {out} is up to date with {recipe}")
    assert json.loads(again.out.splitlines()[-1])["skipped"] is True
