"""`export_model(MODEL_DIR, OUT, format=...)`: any loadable HF directory -> GGUF or ONNX.

The fusion step uses it after writing the fused HF directory; `alloy export` calls it directly.
Each writer puts its file beside the target under a temporary name and renames it at the end,
so a failed export never leaves a file that looks complete.
"""

from __future__ import annotations

import os
from pathlib import Path

from alloy.errors import ConfigError

EXPORT_FORMATS = ("onnx", "gguf")


def export_model(model_dir: str | Path, out: str | Path, *, format: str, dtype: str | None = None) -> Path:
    if format == "gguf":
        from alloy.fuse.gguf import export_gguf

        return export_gguf(model_dir, out, dtype=dtype)
    if format == "onnx":
        from alloy.fuse.onnx import export_onnx

        return export_onnx(model_dir, out, dtype=dtype)
    raise ConfigError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")


def temp_beside(target: Path) -> Path:
    """A name in the target's folder for the file being written (renamed onto target at the end)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def publish(tmp: Path, target: Path) -> Path:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(target)
    return target
