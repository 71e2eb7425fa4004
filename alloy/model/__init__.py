"""The standard model interface's compute half: one Transformer built from a ModelSpec."""

from alloy.model.cache import KVCache, SlotCache
from alloy.model.transformer import Transformer

__all__ = ["KVCache", "SlotCache", "Transformer"]
