"""The model a user names: a preset, an HF folder or config.json, a GGUF file, or a hub id in the
local Hugging Face cache -> its ModelSpec. Here, not in alloy.spec: reading files of checkpoint
formats is this package's job, and the spec stays plain Python that imports nothing of Alloy's."""

from __future__ import annotations

from pathlib import Path

from alloy.errors import ConfigError
from alloy.spec import PRESETS, ModelSpec, read_config


def resolve_spec(model: str | Path) -> ModelSpec:
    """A ModelSpec from a preset name, an HF directory, a config.json path, a GGUF file, or a
    hub id (org/name[@revision]) in the local Hugging Face cache."""
    if str(model) in PRESETS:
        return ModelSpec.from_hf_config(PRESETS[str(model)])
    from alloy.checkpoint.hub import resolve_model

    path = resolve_model(model)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()):
        from alloy.checkpoint.gguf_in import find_gguf, read_spec

        gguf_file = find_gguf(path)
        if gguf_file is not None:
            return read_spec(gguf_file)
    if path.exists():
        return ModelSpec.from_hf_config(read_config(path))
    raise ConfigError(
        f"model {str(model)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path"
    )
