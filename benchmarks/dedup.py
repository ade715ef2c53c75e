"""Near-duplicate recall, precision and speed of `nomoat.data.dedup` against datasketch's MinHash + MinHashLSH.

A synthetic corpus of random-word documents with planted copies at known edit levels; ground truth is the exact
Jaccard of word 5-gram sets, and a pair is a duplicate when it reaches the threshold. Both sides use the same
normalised words, shingles, num_perm, threshold and bands x rows; datasketch runs on a prefix of the corpus
(`--datasketch-docs`) because it is slower, and its docs/s is per document on that prefix. Not here: real text,
memory profiling. Usage: `python benchmarks/dedup.py [--docs 50000] [--datasketch-docs 5000] [--json]`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from nomoat.data.dedup import DedupConfig, Deduplicator, normalize

# Target Jaccard levels of planted copies; levels within 0.1 of the threshold are left out because there the
# signature estimate's standard error, sqrt(J(1 - J) / num_perm) ~ 0.035, makes any MinHash a coin toss.
LEVELS = (0.4, 0.6, 0.92, 0.97)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--docs", type=int, default=50_000)
    p.add_argument("--planted", type=float, default=0.2, help="fraction of documents that are edited copies")
    p.add_argument("--datasketch-docs", type=int, default=5_000, help="prefix datasketch runs on; 0 to skip")
    p.add_argument("--vocab", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    return p.parse_args()


def make_corpus(args: argparse.Namespace, k: int) -> tuple[list[str], dict[int, int]]:
    """Documents, and {planted doc index: index of the original it copies}; every copy follows its original."""
    rng = np.random.default_rng(args.seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, rng.integers(3, 10))) for _ in range(args.vocab)]
    n_planted = int(args.docs * args.planted)
    n_orig = args.docs - n_planted
    originals = [[vocab[i] for i in rng.integers(0, args.vocab, rng.integers(100, 300))] for _ in range(n_orig)]
    sources = rng.integers(0, n_orig, n_planted)
    copies = []
    for src, level in zip(sources, rng.choice(LEVELS, n_planted), strict=True):
        words = list(originals[src])
        n_shingles = len(words) - k + 1
        # Replacing a word breaks the k shingles that contain it: J = (S - d) / (S + d) for d broken shingles.
        n_edits = max(1, round(n_shingles * (1 - level) / (1 + level) / k))
        for i in rng.choice(len(words), n_edits, replace=False):
            words[i] = vocab[rng.integers(args.vocab)]
        copies.append(words)
    # Each original sits at its own index; each copy at a random point after its original.
    keys = np.concatenate([np.arange(n_orig), sources + 0.5 + rng.random(n_planted) * (n_orig - sources)])
    order = np.argsort(keys, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    texts = [" ".join(originals[i] if i < n_orig else copies[i - n_orig]) for i in order]
    return texts, {int(position[n_orig + j]): int(position[s]) for j, s in enumerate(sources)}


def jaccard(a: str, b: str, k: int) -> float:
    wa, wb = normalize(a).split(), normalize(b).split()
    sa = {tuple(wa[i : i + k]) for i in range(len(wa) - k + 1)}
    sb = {tuple(wb[i : i + k]) for i in range(len(wb) - k + 1)}
    return len(sa & sb) / len(sa | sb)


def score(texts: list[str], matches: dict[int, list[int]], planted: dict[int, int], cfg: DedupConfig) -> dict:
    """Recall over planted copies at or above the threshold; precision over every dropped document."""
    n = len(texts)
    positives = [
        d for d, s in planted.items() if d < n and jaccard(texts[d], texts[s], cfg.shingle_size) >= cfg.threshold
    ]
    correct = sum(
        any(jaccard(texts[d], texts[m], cfg.shingle_size) >= cfg.threshold for m in ms) for d, ms in matches.items()
    )
    return {
        "positives": len(positives),
        "dropped": len(matches),
        "recall": sum(d in matches for d in positives) / max(1, len(positives)),
        "precision": correct / max(1, len(matches)),
    }


def run_nomoat(texts: list[str], cfg: DedupConfig) -> tuple[dict[int, list[int]], float]:
    d = Deduplicator(cfg)
    matches: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for start in range(0, len(texts), 1024):
        batch = texts[start : start + 1024]
        for i, m in enumerate(d.add_batch(range(start, start + len(batch)), batch), start):
            if m is not None:
                matches[i] = [m]
    return matches, len(texts) / (time.perf_counter() - t0)


def run_datasketch(texts: list[str], cfg: DedupConfig) -> tuple[dict[int, list[int]], float]:
    """datasketch as its README uses it, on the fastest path it offers (`update_batch`), query then insert."""
    from datasketch import MinHash, MinHashLSH

    w = cfg.false_negative_weight
    lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=(1 - w, w))
    assert (lsh.b, lsh.r) == cfg.band_rows, "both sides must band the same way"
    k = cfg.shingle_size
    matches: dict[int, list[int]] = {}
    t0 = time.perf_counter()
    for i, text in enumerate(texts):
        words = normalize(text).split()
        m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed)
        m.update_batch([" ".join(words[j : j + k]).encode() for j in range(max(1, len(words) - k + 1))])
        if hits := lsh.query(m):
            matches[i] = hits
        else:
            lsh.insert(i, m)
    return matches, len(texts) / (time.perf_counter() - t0)


def main() -> None:
    args = parse_args()
    cfg = DedupConfig()
    t0 = time.perf_counter()
    texts, planted = make_corpus(args, cfg.shingle_size)
    print(f"corpus: {len(texts)} docs, {len(planted)} planted copies, levels {LEVELS}, {time.perf_counter() - t0:.1f}s")
    print(
        f"config: shingles {cfg.shingle_size}, num_perm {cfg.num_perm}, threshold {cfg.threshold}, "
        f"bands x rows {cfg.band_rows}"
    )
    matches, ours = run_nomoat(texts, cfg)
    result = {"docs": len(texts), "nomoat_docs_per_s": round(ours, 1), **score(texts, matches, planted, cfg)}
    print(
        f"nomoat: {ours:,.0f} docs/s, recall {result['recall']:.4f} (target >= 0.95), "
        f"precision {result['precision']:.4f} (target >= 0.99)"
    )
    if args.datasketch_docs:
        sub = texts[: args.datasketch_docs]
        ds_matches, theirs = run_datasketch(sub, cfg)
        ds = score(sub, ds_matches, planted, cfg)
        sub_matches = {d: ms for d, ms in matches.items() if d < len(sub)}
        ours_sub = score(sub, sub_matches, planted, cfg)
        result |= {
            "datasketch_docs": len(sub),
            "datasketch_docs_per_s": round(theirs, 1),
            "speedup": round(ours / theirs, 2),
            "datasketch_recall": ds["recall"],
            "datasketch_precision": ds["precision"],
        }
        print(
            f"datasketch on the first {len(sub)} docs: {theirs:,.0f} docs/s, "
            f"recall {ds['recall']:.4f}, precision {ds['precision']:.4f} "
            f"(nomoat on the same prefix: recall {ours_sub['recall']:.4f}, precision {ours_sub['precision']:.4f})"
        )
        print(f"speedup: {ours / theirs:.2f}x docs/s (datasketch per-doc rate from the prefix, not the full corpus)")
    result["targets_met"] = result["recall"] >= 0.95 and result["precision"] >= 0.99
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
