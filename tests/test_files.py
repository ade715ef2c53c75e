"""Tests for nomoat/files.py: folders published whole or not at all, and one reader of JSON records."""

import gzip
import json
from pathlib import Path

import pytest

from nomoat.errors import UserError
from nomoat.files import BadLines, atomic_folder, file_sha256, read_records


def test_atomic_folder_replaces_whole_or_keeps_the_old(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError), atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("failed midway")
    assert (out / "a.txt").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_folder(out) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_file_sha256(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_records_of_lines_and_arrays(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n')
    assert list(read_records(tmp_path / "a.jsonl")) == [(f"{tmp_path / 'a.jsonl'}:1", {"x": 1}),
                                                         (f"{tmp_path / 'a.jsonl'}:3", {"x": 2})]  # fmt: skip
    (tmp_path / "a.json").write_text(json.dumps([{"x": 1}, {"x": 2}]))
    array = tmp_path / "a.json"
    assert [w for w, _ in read_records(array)] == [f"{array}[0]", f"{array}[1]"]
    lines = gzip.decompress(gzip.compress(b'{"x": 3}\n')).splitlines(keepends=True)
    assert list(read_records(tmp_path / "c.jsonl.gz", lines=lines)) == [(f"{tmp_path / 'c.jsonl.gz'}:1", {"x": 3})]


def test_bad_lines_have_one_wording_strict_or_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n{oops\n{"x": 2}\n[1,\n')
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON \(Expecting property name"):
        list(read_records(bad))
    log = BadLines(shown=1)
    assert [r for _, r in read_records(bad, bad_lines=log)] == [{"x": 1}, {"x": 2}]
    log.close()
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"warning: {bad}:2: not valid JSON (") and err[0].endswith("; skipped")
    assert err[1] == "warning: 1 more bad lines skipped, 2 in all" and log.total == 2


def test_binary_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "nul.jsonl").write_bytes(b'{"x": 1}\n{"x"\x00: 2}\n')
    with pytest.raises(UserError, match=r"nul.jsonl:2: binary data \(a NUL byte\)"):
        list(read_records(tmp_path / "nul.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes(b'{"x": "\xe9"}\n')
    with pytest.raises(UserError, match=r"latin.jsonl:1: binary data \(not UTF-8\)"):
        list(read_records(tmp_path / "latin.jsonl"))
    with pytest.raises(UserError, match="nowhere.jsonl: no such file"):
        list(read_records(tmp_path / "nowhere.jsonl"))
