"""Alloy: run standard-architecture language models on every chip you have, at once.

Names are imported on first use, so torch-free parts (spec, devices' schema, the planner)
start fast: `alloy plan` never pays for importing torch.
"""

from __future__ import annotations

import importlib

from alloy.errors import AlloyError, CheckpointError, ConfigError, PlanError, UnsupportedModelError
from alloy.spec import ModelSpec

__version__ = "0.1.0"
_LAZY = {
    "load": "alloy.checkpoint",
    "save": "alloy.checkpoint",
    "Transformer": "alloy.model",
    "KVCache": "alloy.model",
}
__all__ = ["AlloyError", "CheckpointError", "ConfigError", "KVCache", "ModelSpec", "PlanError", "Transformer",
           "UnsupportedModelError", "load", "save"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alloy' has no attribute {name!r}")
