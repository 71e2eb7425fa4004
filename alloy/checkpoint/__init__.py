"""Hugging Face checkpoints in and out, through declarative key maps."""

from alloy.checkpoint.io import load, parse_dtype, save

__all__ = ["load", "parse_dtype", "save"]
