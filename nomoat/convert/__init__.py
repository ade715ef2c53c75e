"""The formats users already hold (Hugging Face folders), read into a Checkpoint and written from one.

load.py reads them through here for every command; `nomoat convert` writes them. Nothing here loads a MODEL
path itself, so the loader can import this package without a circle.
"""

from nomoat.convert.hf import ARCHITECTURES, config_from_hf, config_to_hf, from_hf, load_hf, to_hf

__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "from_hf", "load_hf", "to_hf"]
