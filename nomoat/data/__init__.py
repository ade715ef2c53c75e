"""Data: corpus files to token shards (build.py), recipes of cleaned, deduplicated, weighted sources to shards
(recipe.py), and shards to training and eval batches (loader.py)."""

from nomoat.data.build import build_shards, check_tokenizer_matches, load_manifest, read_documents
from nomoat.data.loader import ShardSet, TokenLoader, iter_eval_batches
from nomoat.data.recipe import build_corpus, load_recipe

__all__ = [
    "ShardSet",
    "TokenLoader",
    "build_corpus",
    "build_shards",
    "check_tokenizer_matches",
    "iter_eval_batches",
    "load_manifest",
    "load_recipe",
    "read_documents",
]
