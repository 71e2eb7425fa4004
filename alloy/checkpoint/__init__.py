"""Models in and out: HF folders through declarative key maps, GGUF files, hub ids in the local
cache. Names are imported on first use, so resolving a hub id or a spec never imports torch."""

from __future__ import annotations

import importlib

_LAZY = {"load": "alloy.checkpoint.io", "save": "alloy.checkpoint.io", "torch_dtype": "alloy.checkpoint.io",
         "resolve_spec": "alloy.checkpoint.resolve"}
__all__ = ["load", "save", "torch_dtype", "resolve_spec"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alloy.checkpoint' has no attribute {name!r}")
