"""Tests for nomoat/data/dedup.py: planted exact and near duplicates, determinism, MinHash accuracy, bad configs."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from nomoat.data.dedup import (
    DedupConfig,
    Deduplicator,
    _permutations,
    dedup,
    minhash_signatures,
    normalize,
    optimal_bands_rows,
)
from nomoat.errors import UserError

SHAKESPEARE = Path(__file__).parent.parent / "nomoat" / "assets" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def docs() -> list[str]:
    """Unrelated ~200-word documents: consecutive stretches of Tiny Shakespeare."""
    words = SHAKESPEARE.read_text().split()
    return [" ".join(words[i : i + 200]) for i in range(0, 200 * 150, 200)]


def edit(text: str, n: int, seed: int) -> str:
    words = text.split()
    rng = random.Random(seed)
    for i in rng.sample(range(len(words)), n):
        words[i] = f"edited{rng.randrange(10**6)}"
    return " ".join(words)


def shingles(text: str, k: int = 5) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[i : i + k]) for i in range(len(words) - k + 1)}


def test_exact_duplicates_differing_in_whitespace_and_case_are_dropped(docs: list[str]) -> None:
    variant = "  " + docs[0].upper().replace(" ", " \n\t ") + "\n"
    d = Deduplicator(DedupConfig())
    assert d.add_batch([10, 11, 12], [docs[0], docs[1], variant]) == [None, None, 10]
    assert d.stats == {"documents": 3, "exact_duplicates": 1, "near_duplicates": 0}


@pytest.mark.parametrize("verify", [True, False])
def test_near_duplicates_are_dropped_and_unrelated_documents_kept(docs: list[str], verify: bool) -> None:
    # Two edits give Jaccard ~0.9, 3.5 standard errors above the threshold; at three (~0.86) any MinHash family
    # estimates below 0.8 for ~2% of copies, so some of ten would fail verification by chance.
    planted = [edit(docs[i], 2, seed=i) for i in range(0, 40, 4)]
    d = Deduplicator(DedupConfig(verify=verify))
    assert all(d.add(i, t) for i, t in enumerate(docs))
    assert not any(d.add(1000 + i, t) for i, t in enumerate(planted))
    assert d.stats == {"documents": len(docs) + len(planted), "exact_duplicates": 0, "near_duplicates": len(planted)}
    assert d.add_batch([2000], [edit(docs[8], 2, seed=99)]) == [8]  # names the kept doc it duplicates


def test_documents_below_threshold_are_kept(docs: list[str]) -> None:
    far = edit(docs[0], 40, seed=0)  # about 40 of 196 shingles each side survive: Jaccard well below 0.8
    assert len(shingles(far) & shingles(docs[0])) / len(shingles(far) | shingles(docs[0])) < 0.5
    assert list(dedup([docs[0], far], DedupConfig())) == [True, True]


def test_short_and_empty_documents() -> None:
    flags = list(dedup(["", "  \n", "to be", "To  be", "or not", "a b c d e f"], DedupConfig()))
    assert flags == [True, False, True, False, True, True]


def test_deterministic_and_independent_of_batch_size(docs: list[str]) -> None:
    corpus = docs[:60] + [edit(docs[i], 2, seed=i) for i in range(0, 60, 3)] + [docs[5].lower()]
    random.Random(0).shuffle(corpus)
    cfg = DedupConfig()
    expected = list(dedup(corpus, cfg))
    assert sum(not f for f in expected) == 21
    for batch_size in (1, 7, 1024):
        assert list(dedup(corpus, cfg, batch_size=batch_size)) == expected
    np.testing.assert_array_equal(minhash_signatures(corpus, cfg), minhash_signatures(corpus, cfg))
    # A batch's signatures equal those computed one document at a time (chunk boundaries do not leak).
    np.testing.assert_array_equal(minhash_signatures(corpus[:5], cfg)[3], minhash_signatures([corpus[3]], cfg)[0])
    assert not np.array_equal(minhash_signatures(corpus[:3], cfg), minhash_signatures(corpus[:3], DedupConfig(seed=2)))


def test_signature_agreement_estimates_jaccard(docs: list[str]) -> None:
    cfg = DedupConfig(num_perm=256)
    for i, n_edits in enumerate((1, 5, 10, 20, 40)):
        a, b = docs[i], edit(docs[i], n_edits, seed=i)
        exact = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
        sig = minhash_signatures([a, b], cfg)
        estimate = float(np.mean(sig[0] == sig[1]))
        assert abs(estimate - exact) < 0.1, (n_edits, exact, estimate)  # ~3.5 standard errors at num_perm=256
    sig = minhash_signatures([docs[0], docs[1]], cfg)
    assert np.mean(sig[0] == sig[1]) < 0.05


def test_signatures_match_python_integer_reference() -> None:
    """The vectorised path against the definition, in Python integers: blake2b words, Horner over k-grams, an
    xorshift, then min over shingles of (a*x + b) mod 2^64 per permutation."""
    cfg, mask = DedupConfig(num_perm=16, shingle_size=3), (1 << 64) - 1
    texts = ["the quick brown fox jumps over the lazy dog", "to be", "", "a b c a b c a b c"]

    def word_hash(w: str) -> int:
        return int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")

    a, b = (col[:, 0].tolist() for col in _permutations(cfg))
    assert all(ai % 2 == 1 for ai in a)
    want = []
    for text in texts:
        words = normalize(text).split()
        words = words if len(words) >= 3 else [*words, "", "", ""][:3]
        xs = []
        for i in range(len(words) - 2):
            x = 0
            for w in words[i : i + 3]:
                x = (x * 0x9E3779B97F4A7C15 + word_hash(w)) & mask
            xs.append(x ^ (x >> 32))
        want.append([min((ai * x + bi) & mask for x in xs) for ai, bi in zip(a, b, strict=True)])
    assert minhash_signatures(texts, cfg).tolist() == want


def test_bands_and_rows_match_datasketch() -> None:
    lsh = pytest.importorskip("datasketch.lsh")
    for threshold, num_perm, fn_weight in [(0.8, 128, 0.5), (0.5, 64, 0.5), (0.9, 256, 0.5), (0.8, 128, 0.8)]:
        want = lsh._optimal_param(threshold, num_perm, 1 - fn_weight, fn_weight)
        assert optimal_bands_rows(threshold, num_perm, fn_weight) == want
    assert DedupConfig().band_rows == (16, 8)
    assert DedupConfig(bands=32, rows=4).band_rows == (32, 4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bands": 16, "rows": 4}, "bands \\* rows must equal num_perm"),
        ({"bands": 16}, "given together"),
        ({"threshold": 1.0}, "threshold must be in \\(0, 1\\)"),
        ({"threshold": 0.0}, "threshold must be in \\(0, 1\\)"),
        ({"shingle_size": 0}, "shingle_size"),
        ({"num_perm": 0}, "num_perm"),
        ({"false_negative_weight": 1.0}, "false_negative_weight"),
    ],
)
def test_bad_config_raises_user_error(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        DedupConfig(**kwargs)
