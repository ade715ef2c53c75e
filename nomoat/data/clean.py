"""Text normalisation and Gopher-style quality filters for building a corpus.

`normalize` and `strip_gutenberg` repair text; `check` names the first quality rule a document fails; `filter_documents`
applies both to a stream and counts drops per rule. Not here: deduplication across documents, language
identification, model-based quality scores, and Gopher's paragraph-level repetition rules (our sources mark
paragraphs inconsistently, so lines stand in for them).
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from itertools import accumulate

from nomoat.errors import UserError

_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.MULTILINE | re.IGNORECASE)
_WORD = re.compile(r"\w+")
BULLETS = ("•", "‣", "◦", "●", "·", "-", "*")
ELLIPSES = ("...", "…")


@cache
def _invisible() -> re.Pattern[str]:
    """Control (Cc) and format (Cf) characters except \\t and \\n, and except the zero-width (non-)joiners, which
    change how Persian, Indic scripts and emoji render. Built once, from this Python's Unicode tables."""
    keep = {"\t", "\n", "\u200c", "\u200d"}
    chars = (chr(i) for i in range(sys.maxunicode + 1))
    drop = [c for c in chars if unicodedata.category(c) in ("Cc", "Cf") and c not in keep]
    return re.compile("[" + "".join(re.escape(c) for c in drop) + "]")


def normalize(text: str) -> str:
    """Turn \\r\\n and lone \\r into \\n, drop invisible control and format characters, then compose to NFC."""
    text = _invisible().sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    # Removal comes first: a format character between a letter and its accent would otherwise block composition.
    return unicodedata.normalize("NFC", text)


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg ebook: between its START and END marker lines. Unchanged without them."""
    if start := _GUTENBERG_START.search(text):
        text = text[start.end() :]
    if end := _GUTENBERG_END.search(text):
        text = text[: end.start()]
    return text.strip("\n") + "\n" if start or end else text


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """Gopher's document rules (arXiv:2112.11446, appendix A.1.1). None disables a rule; an n left out of
    `max_top_ngram` or `max_dup_ngram` disables that n. N-gram fractions are of the characters in words."""

    min_words: int | None = 50
    max_words: int | None = 100_000
    mean_word_length: tuple[float, float] | None = (3, 10)
    max_symbol_ratio: float | None = 0.1  # ('#' + ellipses) per word
    max_bullet_lines: float | None = 0.9
    max_ellipsis_lines: float | None = 0.3
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")
    min_stop_words: int | None = 2  # distinct stop words present: "the the the" is not English
    # Gopher's 0.3 is kept although rapid dialogue trips it (speaker names are repeated lines): 5 of 195
    # 1,000-word chunks of tinyshakespeare fail. The rule exists for web menus and boilerplate, whose short lines
    # the character rule below misses; set it to None for a source of plays or chat logs.
    max_dup_line_fraction: float | None = 0.3
    max_dup_line_chars: float | None = 0.2
    max_top_ngram: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    max_dup_ngram: tuple[tuple[int, float], ...] = ((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))

    def __post_init__(self) -> None:
        if self.min_words is not None and self.max_words is not None and self.min_words > self.max_words:
            raise UserError(f"min_words {self.min_words} > max_words {self.max_words}")
        if self.mean_word_length is not None and not 0 <= self.mean_word_length[0] <= self.mean_word_length[1]:
            raise UserError(f"mean_word_length {self.mean_word_length}: want 0 <= low <= high")
        for n, limit in (*self.max_top_ngram, *self.max_dup_ngram):
            if n < 1 or not 0 <= limit <= 1:
                raise UserError(f"n-gram rule ({n}, {limit}): want n >= 1 and a fraction in [0, 1]")


def _ngrams(words: list[str], n: int) -> Iterator[tuple[str, ...]]:
    return zip(*(words[i:] for i in range(n)), strict=False)  # shorter tails end it


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters in the most frequent n-gram's occurrences over all word characters (0 if none repeats)."""
    counts = Counter(_ngrams(words, n))
    if not counts:
        return 0.0
    gram, count = counts.most_common(1)[0]
    return sum(map(len, gram)) * count / total_chars if count > 1 else 0.0


def _dup_ngram_fraction(words: list[str], prefix: list[int], n: int) -> float:
    """Characters in repeats of an earlier n-gram over all word characters, overlaps counted once.

    A first occurrence is not a duplicate (as in datatrove's Gopher filter), so a text said twice scores ~0.5."""
    seen: set[tuple[str, ...]] = set()
    covered = covered_to = 0
    for i, gram in enumerate(_ngrams(words, n)):
        if gram in seen:
            start = max(i, covered_to)
            covered += prefix[i + n] - prefix[start]
            covered_to = i + n
        else:
            seen.add(gram)
    return covered / prefix[-1]


def check(text: str, cfg: FilterConfig) -> str | None:
    """The name of the first rule `text` fails, or None if it passes them all. Cheap rules run first."""
    words = text.split()
    if cfg.min_words is not None and len(words) < cfg.min_words:
        return "min_words"
    if cfg.max_words is not None and len(words) > cfg.max_words:
        return "max_words"
    if not words:
        return None  # every remaining rule is a ratio over words; min_words is the guard against empty text
    if cfg.mean_word_length is not None:
        low, high = cfg.mean_word_length
        if not low <= sum(map(len, words)) / len(words) <= high:
            return "mean_word_length"
    if cfg.max_symbol_ratio is not None:
        symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
        if symbols / len(words) > cfg.max_symbol_ratio:
            return "symbol_ratio"
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    bullets = sum(line.startswith(BULLETS) for line in lines)
    if cfg.max_bullet_lines is not None and bullets > cfg.max_bullet_lines * len(lines):
        return "bullet_lines"
    ellipses = sum(line.endswith(ELLIPSES) for line in lines)
    if cfg.max_ellipsis_lines is not None and ellipses > cfg.max_ellipsis_lines * len(lines):
        return "ellipsis_lines"
    # Repetition rules compare words without case or punctuation, so "Away, away!" repeats a 1-gram.
    tokens = _WORD.findall(text.lower())
    if cfg.min_stop_words is not None and len(set(tokens).intersection(cfg.stop_words)) < cfg.min_stop_words:
        return "stop_words"
    if cfg.max_dup_line_fraction is not None or cfg.max_dup_line_chars is not None:
        seen: set[str] = set()
        dup_lines = dup_chars = 0
        for line in lines:
            if line in seen:
                dup_lines, dup_chars = dup_lines + 1, dup_chars + len(line)
            seen.add(line)
        if cfg.max_dup_line_fraction is not None and dup_lines > cfg.max_dup_line_fraction * len(lines):
            return "dup_line_fraction"
        if cfg.max_dup_line_chars is not None and dup_chars > cfg.max_dup_line_chars * sum(map(len, lines)):
            return "dup_line_chars"
    if not tokens:
        return None
    prefix = [0, *accumulate(map(len, tokens))]
    for n, limit in cfg.max_top_ngram:
        if _top_ngram_fraction(tokens, n, prefix[-1]) > limit:
            return f"top_{n}gram"
    for n, limit in cfg.max_dup_ngram:
        if _dup_ngram_fraction(tokens, prefix, n) > limit:
            return f"dup_{n}gram"
    return None


def filter_documents(docs: Iterable[str], cfg: FilterConfig, counts: Counter[str]) -> Iterator[str]:
    """Normalise each document and yield those that pass `check`, adding one to counts[rule] per drop and to
    counts["kept"] per document kept. Pass one Counter per source to see which rules bite where."""
    for doc in docs:
        doc = normalize(doc)
        rule = check(doc, cfg)
        counts[rule or "kept"] += 1
        if rule is None:
            yield doc
