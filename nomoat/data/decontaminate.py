"""Drop training documents that share a word n-gram with an evaluation item, as GPT-3 did (arXiv:2005.14165, app. C).

Words are lowercased with punctuation stripped, so case and punctuation changes do not hide a copied passage.
N-grams are kept as 64-bit hashes with the eval item ids they came from; `hits` counts drops per item.
Not here: GPT-3's per-dataset choice of n and its exemption of n-grams common in training data (pass n instead),
and removal of only the overlapping span (a contaminated document is dropped whole).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from nomoat.errors import UserError
from nomoat.files import read_records

_PUNCT = re.compile(r"[^\w\s]|_")


def _words(text: str) -> list[str]:
    """Lowercase words with punctuation removed: "Don't STOP." -> ["dont", "stop"]."""
    return _PUNCT.sub("", text.lower()).split()


def _hashes(text: str, n: int) -> Iterator[int]:
    ws = _words(text)
    for i in range(len(ws) - n + 1):
        digest = hashlib.blake2b(" ".join(ws[i : i + n]).encode(), digest_size=8).digest()
        yield int.from_bytes(digest, "little")


class Decontaminator:
    """Word n-grams of evaluation items, and a filter that drops training text sharing any of them.

    Items shorter than n words cannot be matched; their ids are listed in `too_short` so a report can say so.
    """

    def __init__(self, eval_texts: Mapping[str, str] | Iterable[tuple[str, str]], n: int = 13):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        self.hits: Counter[str] = Counter()
        self.too_short: list[str] = []
        # Almost every n-gram belongs to one item, so a bare id is stored and a tuple only for shared n-grams:
        # millions of n-grams make a set per entry cost several times the table itself.
        self._owners: dict[int, str | tuple[str, ...]] = {}
        items = eval_texts.items() if isinstance(eval_texts, Mapping) else eval_texts
        for item_id, text in items:
            found = False
            for h in _hashes(text, n):
                found = True
                owner = self._owners.setdefault(h, item_id)
                if owner != item_id and not (isinstance(owner, tuple) and item_id in owner):
                    self._owners[h] = (*owner, item_id) if isinstance(owner, tuple) else (owner, item_id)
            if not found:
                self.too_short.append(item_id)

    def __len__(self) -> int:
        return len(self._owners)

    def contaminated_by(self, text: str) -> list[str]:
        """Ids of the eval items that share at least one n-gram with `text`, in order of first overlap."""
        found: dict[str, None] = {}
        for h in _hashes(text, self.n):
            owner = self._owners.get(h)
            if owner is not None:
                found.update(dict.fromkeys((owner,) if isinstance(owner, str) else owner))
        return list(found)

    def filter_documents(self, docs: Iterable[str]) -> Iterator[str]:
        """Yield the documents that share no n-gram with any eval item; count each drop in `hits` per item."""
        for doc in docs:
            ids = self.contaminated_by(doc)
            self.hits.update(ids)
            if not ids:
                yield doc


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: eval file not found") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def load_eval_files(paths: Sequence[str | Path], field: str = "text") -> dict[str, str]:
    """Eval items keyed "path:k": from .txt one per blank-line-separated paragraph (k counts paragraphs from 1),
    from .jsonl the string `field` of each line (k is the line number)."""
    items: dict[str, str] = {}
    for path in map(Path, paths):
        text = _read(path)
        if path.suffix == ".txt":
            paragraphs = (p.strip() for p in re.split(r"\n\s*\n", text))
            items.update((f"{path}:{k}", p) for k, p in enumerate(filter(None, paragraphs), 1))
        elif path.suffix == ".jsonl":
            # The text is read already, so that a missing or non-UTF-8 file is named as an eval file.
            for where, record in read_records(path, lines=text.encode().splitlines()):
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise UserError(f"{where}: no string field {field!r}")
                items[where] = record[field]
        else:
            raise UserError(f"{path}: eval files must be .txt or .jsonl")
    return items
