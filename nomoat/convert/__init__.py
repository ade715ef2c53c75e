"""Conversion between nomoat checkpoints and the formats users already hold (Hugging Face folders)."""

from nomoat.convert.hf import ARCHITECTURES, config_from_hf, config_to_hf, from_hf, load_hf, to_hf

__all__ = ["ARCHITECTURES", "config_from_hf", "config_to_hf", "from_hf", "load_hf", "to_hf"]
