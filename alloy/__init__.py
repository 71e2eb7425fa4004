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
    "Model": "alloy.framework",
}
_SUBMODULES = {"layers": "alloy.layers", "text": "alloy.text", "callbacks": "alloy.callbacks", "data": "alloy.data"}
__all__ = ["AlloyError", "CheckpointError", "ConfigError", "KVCache", "Model", "ModelSpec", "PlanError", "Transformer",
           "UnsupportedModelError", "load", "save"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:  # alloy.layers, alloy.text, ... : the seed example's building blocks
        return importlib.import_module(_SUBMODULES[name])
    raise AttributeError(f"module 'alloy' has no attribute {name!r}")
