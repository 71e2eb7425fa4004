"""`export_model(MODEL_DIR, OUT, format=...)`: any loadable HF directory -> GGUF or ONNX.

The fusion step uses it after writing the fused HF directory; `alloy export` calls it directly.
Each writer puts its file beside the target under a temporary name and renames it at the end,
so a failed export never leaves a file that looks complete. An existing file is replaced only
when it is a previous export of the same format and `overwrite` (--force) says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from alloy.checkpoint.io import staging_path, sweep_stale, umask
from alloy.errors import ConfigError

EXPORT_FORMATS = ("onnx", "gguf")


def export_model(model_dir: str | Path, out: str | Path, *, format: str, dtype: str | None = None,
                 overwrite: bool = False) -> Path:
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if format != "gguf" and dtype in ("q8_0", "q4_0", "q4_1", "q4_k"):
        raise ConfigError(f"--dtype {dtype} is a GGUF block format; export it with --format gguf")
    target = check_output_file(out, format, overwrite=overwrite)
    if format == "gguf":
        from alloy.fuse.gguf import export_gguf

        return export_gguf(model_dir, target, dtype=dtype)
    from alloy.fuse.onnx import export_onnx

    return export_onnx(model_dir, target, dtype=dtype)


def check_output_file(path: str | Path, format: str, *, overwrite: bool) -> Path:
    """Refuse to write over a folder, or over a file unless it is a `format` file and `overwrite`
    says to replace it. Sweeps what a killed writer of this file left first."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    if target.is_dir() or (target.exists() and not target.is_file()):
        raise ConfigError(f"{target}: exists and is not a file; give the path of the {format} file to write")
    if target.exists():
        if not _is_format(target, format):
            raise ConfigError(f"{target}: exists and is not a {format} file; write the output somewhere else")
        if not overwrite:
            raise ConfigError(f"{target}: already exists; replace it with --force (overwrite=True)")
    return target


def _is_format(path: Path, format: str) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(4)
    if format == "gguf":
        return head == b"GGUF"
    # An ONNX file is a ModelProto, serialised field by field in number order: ir_version
    # (field 1, a varint) comes first, so its first byte is the tag 0x08.
    return path.suffix == ".onnx" and head[:1] == b"\x08"


def temp_beside(target: Path) -> Path:
    """A name in the target's folder for the file being written (renamed onto target at the end);
    swept by the next export to the same target if this process is killed before then."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return staging_path(target)


def publish(tmp: Path, target: Path) -> Path:
    os.chmod(tmp, 0o666 & ~umask())
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(target)
    return target
