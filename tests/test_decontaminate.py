"""Tests for nomoat/data/decontaminate.py: n-gram overlap with eval items, the drop report, and eval file loading."""

import json
import re

import pytest

from nomoat.data.decontaminate import Decontaminator, load_eval_files
from nomoat.errors import UserError

PASSAGE = "the quick brown fox jumps over the lazy dog while seven wizards quietly box jugs of liquor"
EVAL = {
    "pangram": f"Question: {PASSAGE}. Which animal jumps?",
    "other": "A completely different question about the boiling point of water at sea level in degrees celsius today.",
}
TRAIN_CLEAN = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 3


def test_planted_passage_is_dropped_despite_case_and_punctuation():
    dec = Decontaminator(EVAL)
    # 13 consecutive words of the passage, re-cased and re-punctuated, inside an unrelated document.
    planted = "The QUICK brown fox -- jumps over the lazy dog, while seven wizards quietly box!"
    dirty = f"{TRAIN_CLEAN} As the saying goes: {planted} And so on."
    assert dec.contaminated_by(dirty) == ["pangram"]
    assert dec.contaminated_by(TRAIN_CLEAN) == []
    kept = list(dec.filter_documents([TRAIN_CLEAN, dirty, dirty, "short"]))
    assert kept == [TRAIN_CLEAN, "short"]
    assert dec.hits == {"pangram": 2}


def test_twelve_word_overlap_does_not_trigger():
    twelve = " ".join(PASSAGE.split()[:12])
    assert Decontaminator(EVAL).contaminated_by(f"{TRAIN_CLEAN} {twelve}. Then something else.") == []
    assert Decontaminator(EVAL, n=12).contaminated_by(twelve) == ["pangram"]


def test_shared_ngrams_report_every_item_and_short_items_are_listed():
    dec = Decontaminator([("a", PASSAGE), ("b", PASSAGE.upper()), ("tiny", "too short to match")], n=13)
    assert dec.contaminated_by(PASSAGE) == ["a", "b"]
    assert dec.too_short == ["tiny"]
    assert len(dec) == len(PASSAGE.split()) - 13 + 1
    with pytest.raises(ValueError):
        Decontaminator(EVAL, n=0)


def test_load_eval_files(tmp_path):
    txt = tmp_path / "items.txt"
    txt.write_text("first item\nspans two lines\n\n\n  \nsecond item\n")
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "q": "why"}) + "\n")
    assert load_eval_files([txt, jsonl]) == {
        f"{txt}:1": "first item\nspans two lines",
        f"{txt}:2": "second item",
        f"{jsonl}:1": "one",
        f"{jsonl}:3": "two",
    }
    with pytest.raises(UserError, match=re.escape(f"{jsonl}:1: no string field 'q'")):
        load_eval_files([jsonl], field="q")


def test_load_eval_files_errors(tmp_path):
    with pytest.raises(UserError, match="missing.txt: eval file not found"):
        load_eval_files([tmp_path / "missing.txt"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=re.escape(f"{bad}:2: not valid JSON")):
        load_eval_files([bad])
    csv = tmp_path / "items.csv"
    csv.write_text("a,b\n")
    with pytest.raises(UserError, match=r"\.txt or \.jsonl"):
        load_eval_files([csv])
