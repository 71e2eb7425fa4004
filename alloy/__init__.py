"""Alloy: run standard-architecture language models on every chip you have, at once."""

from alloy.checkpoint import load, save
from alloy.errors import AlloyError, CheckpointError, ConfigError, UnsupportedModelError
from alloy.model import KVCache, Transformer
from alloy.spec import ModelSpec

__version__ = "0.1.0"
__all__ = [
    "AlloyError", "CheckpointError", "ConfigError", "KVCache", "ModelSpec", "Transformer",
    "UnsupportedModelError", "load", "save",
]
