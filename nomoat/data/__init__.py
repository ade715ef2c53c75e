"""Data: corpus files to token shards (build.py) and shards to training and eval batches (loader.py)."""

from nomoat.data.build import build_shards, check_tokenizer_matches, load_manifest, read_documents
from nomoat.data.loader import ShardSet, TokenLoader, iter_eval_batches

__all__ = [
    "ShardSet",
    "TokenLoader",
    "build_shards",
    "check_tokenizer_matches",
    "iter_eval_batches",
    "load_manifest",
    "read_documents",
]
