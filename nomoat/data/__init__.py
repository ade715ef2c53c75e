"""Data: corpus files read (formats.py), tokenized (encode.py) and written as token shards (shards.py); recipes of
cleaned, deduplicated, weighted sources (recipe.py, stages.py) built into shards (corpus.py, ray_engine.py) with
a datasheet (datasheet.py); and shards to training and eval batches (loader.py)."""

from nomoat.data.corpus import build_corpus
from nomoat.data.datasheet import write_source_datasheet
from nomoat.data.formats import read_documents
from nomoat.data.loader import ShardSet, TokenLoader, iter_eval_batches
from nomoat.data.recipe import load_recipe
from nomoat.data.shards import build_shards, check_tokenizer_matches, load_manifest

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
    "write_source_datasheet",
]
