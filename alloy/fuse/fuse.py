"""Fuse a distributed run's checkpoint shards into one standard Hugging Face directory.

Seed step 4 (model fusion). It streams: one rank's shard is read, converted to the family's
HF names and written as one output file before the next is read, so a model larger than RAM
still fuses. Output goes to a staging directory renamed into place only when complete.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alloy.checkpoint.io import hf_tensors, parse_dtype, replace_dir, write_hf_config
from alloy.errors import CheckpointError
from alloy.runtime.checkpoint import complete_checkpoints, read_manifest, step_dir
from alloy.runtime.layout import RunLayout
from alloy.spec import ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def find_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    root = run_dir / "checkpoints"
    found = complete_checkpoints(root)
    if step is not None:
        wanted = step_dir(root, step)
        if wanted not in found:
            have = ", ".join(p.name.split("-")[1].lstrip("0") or "0" for p in found) or "none"
            raise CheckpointError(f"{run_dir}: no complete checkpoint at step {step} (complete: {have})")
        return wanted
    if not found:
        hint = " (a .partial directory is an interrupted save)" if list(root.glob("*.partial")) else ""
        raise CheckpointError(f"{run_dir}: no complete checkpoint under {root}{hint}")
    return found[-1]


def _params(path: Path) -> dict[str, torch.Tensor]:
    """The parameters of one rank's shard (not its optimizer state), read lazily."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k.removeprefix("param."): handle.get_tensor(k) for k in handle.keys() if k.startswith("param.")}
    except Exception as err:
        raise CheckpointError(f"{path}: unreadable shard ({' '.join(str(err).split())[:200]})") from None


def fuse_run(run_dir: str | Path, out: str | Path, *, step: int | None = None, dtype: str | None = None) -> Path:
    """Write the run's checkpoint (latest complete one, or `step`) as an HF directory at `out`."""
    run_dir, target = Path(run_dir), Path(out)
    checkpoint = find_checkpoint(run_dir, step)
    manifest = read_manifest(checkpoint)
    spec = ModelSpec.from_dict(manifest["spec"])
    layout = RunLayout.from_dict(manifest["layout"])
    layout.validate(spec)  # every layer exactly once per replica
    for name in manifest["files"]:
        if not (checkpoint / name).is_file():
            raise CheckpointError(f"{checkpoint}: shard {name} is missing")
    out_dtype = parse_dtype(dtype)
    ranks = layout.ranks()
    stages = [info for info in ranks if info.replica == 0]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for n, info in enumerate(stages, 1):
            state = _params(checkpoint / f"rank{info.rank}.safetensors")
            _check_replicas_agree(checkpoint, state, [i for i in ranks if i.replica > 0], info)
            if spec.tie_embeddings:
                state.pop("head.weight", None)  # the head stage's copy of the tied embeddings
            tensors = hf_tensors(spec, state, partial=True)
            if out_dtype is not None:
                tensors = {k: v.to(out_dtype) for k, v in tensors.items()}
            filename = f"model-{n:05d}-of-{len(stages):05d}.safetensors"
            save_file(tensors, str(staging / filename), metadata={"format": "pt"})
            weight_map.update({k: filename for k in tensors})
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            stored_dtype = next(iter(tensors.values())).dtype
            del state, tensors
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_hf_config(spec, staging, stored_dtype)
        for name in TOKENIZER_FILES:
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, staging / name)
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _check_replicas_agree(checkpoint: Path, state: dict, others, info) -> None:
    """Data-parallel replicas must hold identical weights; report the largest difference if not."""
    for other in others:
        overlaps = other.stage.first < info.stage.last and info.stage.first < other.stage.last
        if not (overlaps or (other.stage.embed and info.stage.embed) or (other.stage.head and info.stage.head)):
            continue
        theirs = _params(checkpoint / f"rank{other.rank}.safetensors")
        worst, where = 0.0, ""
        for name, tensor in theirs.items():
            if name in state and name != "head.weight":
                diff = (tensor.float() - state[name].float()).abs().max().item()
                if diff > worst:
                    worst, where = diff, name
        if worst > 0:
            raise CheckpointError(f"{checkpoint}: replicas diverged — replica {other.replica} differs from "
                                  f"replica 0 by up to {worst:.3g} at {where}")
