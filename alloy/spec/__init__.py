"""The standard model interface's description half: ModelSpec, its HF adapters, presets."""

from alloy.spec.presets import PRESETS
from alloy.spec.spec import ModelSpec, read_config

__all__ = ["PRESETS", "ModelSpec", "read_config"]
