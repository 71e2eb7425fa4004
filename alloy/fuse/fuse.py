"""Fuse a distributed run's checkpoint shards into one standard model (seed step 4).

Before anything is written, every shard is checked against the manifest: present, the size
the manifest recorded (not truncated), and holding exactly its stage's parameters with the
shapes the manifest's model implies (so a manifest from another model is caught); the layout
must tile every layer exactly once. Then it streams: one stage's shard is read, converted to
the family's HF names and written as one output file before the next is read, and replicas
are compared with it tensor by tensor — so a model larger than RAM still fuses. Output goes to
a staging directory renamed into place only when complete; it never replaces the run itself,
nor anything but a previous model, and that only with `overwrite` (--force).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from alloy.checkpoint.io import (check_output_dir, hf_tensors, parse_dtype, staged_dir, staging_path,
                                write_hf_config)
from alloy.errors import AlloyError, CheckpointError
from alloy.model import Transformer
from alloy.runtime.checkpoint import complete_checkpoints, read_manifest, step_dir, verify_files
from alloy.runtime.layout import RankInfo, RunLayout
from alloy.spec import ModelSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FORMATS = ("hf", "gguf", "onnx")


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


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable shard ({_one_line(err)})") from None


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:200]


def _get(handle, path: Path, name: str) -> torch.Tensor:
    try:
        return handle.get_tensor(f"param.{name}")
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read {name} ({_one_line(err)})") from None


def expected_params(spec: ModelSpec, info: RankInfo) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes a rank's stage holds (built on the meta device: no memory)."""
    stage = info.stage
    with torch.device("meta"):
        model = Transformer(spec, (stage.first, stage.last), embed=stage.embed, head=stage.head)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_checkpoint(checkpoint: Path) -> tuple[ModelSpec, RunLayout]:
    """Everything about a checkpoint that can be checked without reading its tensors' data."""
    manifest = read_manifest(checkpoint)
    try:
        spec = ModelSpec.from_dict(manifest["spec"])
        layout = RunLayout.from_dict(manifest["layout"])
        layout.validate(spec)  # every layer exactly once per replica
    except (AlloyError, KeyError, TypeError) as err:
        raise CheckpointError(f"{checkpoint}/manifest.json: {err}") from None
    for info in layout.ranks():
        verify_files(checkpoint, manifest, (f"rank{info.rank}.safetensors", f"rank{info.rank}.json"))
        _check_shard_holds_its_stage(checkpoint / f"rank{info.rank}.safetensors", spec, info)
    return spec, layout


def _check_shard_holds_its_stage(path: Path, spec: ModelSpec, info: RankInfo) -> None:
    stage = info.stage
    where = f"{path}: replica {info.replica} stage {info.stage_index} (layers [{stage.first}, {stage.last}))"
    wanted = expected_params(spec, info)
    with _open(path) as handle:
        held = {k.removeprefix("param."): tuple(handle.get_slice(k).get_shape())
                for k in handle.keys() if k.startswith("param.")}
    extra = sorted(set(held) - set(wanted))
    if extra:
        raise CheckpointError(f"{where} also holds {extra[0]}, which belongs to another stage "
                              f"({len(extra)} such tensors) — layers duplicated across shards?")
    missing = sorted(set(wanted) - set(held))
    if missing:
        raise CheckpointError(f"{where} lacks {missing[0]} ({len(missing)} missing)")
    for name, shape in wanted.items():
        if held[name] != shape:
            raise CheckpointError(f"{where}: {name} has shape {list(held[name])} but the manifest's model implies "
                                  f"{list(shape)} — is the manifest from another model?")


def fuse_run(run_dir: str | Path, out: str | Path, *, step: int | None = None, dtype: str | None = None,
             format: str = "hf", overwrite: bool = False) -> Path:
    """Write the run's checkpoint (latest complete one, or `step`) as one model at `out`: an HF
    directory, a GGUF file or an ONNX file. A previous output there is replaced only with `overwrite`."""
    from alloy.fuse.export import check_output_file, export_model

    if format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    if format == "hf":
        target = check_output_dir(out, overwrite=overwrite, inputs=[run_dir])
    else:
        target = check_output_file(out, format, overwrite=overwrite)
    checkpoint = find_checkpoint(run_dir, step)
    spec, layout = check_checkpoint(checkpoint)
    out_dtype = parse_dtype(dtype)
    if format == "hf":
        return _fuse_hf(run_dir, checkpoint, spec, layout, target, out_dtype)
    # GGUF/ONNX read the fused HF directory layer by layer; it lives on disk, not in RAM, in a
    # scratch folder named like a staging one, so that it is swept if this process is killed.
    scratch = staging_path(target)
    scratch.mkdir()
    try:
        hf_dir = _fuse_hf(run_dir, checkpoint, spec, layout, scratch / "hf", out_dtype)
        return export_model(hf_dir, target, format=format, dtype=dtype, overwrite=overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fuse_hf(run_dir: Path, checkpoint: Path, spec: ModelSpec, layout: RunLayout, target: Path,
             out_dtype: torch.dtype | None) -> Path:
    ranks = layout.ranks()
    stages = [info for info in ranks if info.replica == 0]
    with staged_dir(target) as staging:
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for n, info in enumerate(stages, 1):
            path = checkpoint / f"rank{info.rank}.safetensors"
            with _open(path) as handle:
                state = {name: _get(handle, path, name) for name in expected_params(spec, info)}
            _check_replicas_agree(checkpoint, spec, state, ranks, info)
            if spec.tie_embeddings:
                state.pop("head.weight", None)  # the head stage's copy of the tied embeddings
            tensors = hf_tensors(spec, state, partial=True)
            del state
            if out_dtype is not None:
                tensors = {k: v.to(out_dtype) for k, v in tensors.items()}
            filename = f"model-{n:05d}-of-{len(stages):05d}.safetensors"
            save_file(tensors, str(staging / filename), metadata={"format": "pt"})
            weight_map.update({k: filename for k in tensors})
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            stored_dtype = next(iter(tensors.values())).dtype
            del tensors
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        write_hf_config(spec, staging, stored_dtype)
        for name in TOKENIZER_FILES:
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, staging / name)
    return target


def _check_replicas_agree(checkpoint: Path, spec: ModelSpec, state: dict, ranks: list[RankInfo],
                          info: RankInfo) -> None:
    """Data-parallel replicas must hold identical weights, and a tied head's copy must equal the
    embeddings; report the largest difference if not. Compared one tensor at a time."""
    worst, where, who = 0.0, "", ""
    for other in ranks:
        if other.rank == info.rank:
            continue
        theirs = set(expected_params(spec, other))
        pairs = [(name, name) for name in state if name in theirs]
        if spec.tie_embeddings and "head.weight" in theirs and "embed.tok.weight" in state:
            pairs.append(("head.weight", "embed.tok.weight"))
        if not pairs:
            continue
        path = checkpoint / f"rank{other.rank}.safetensors"
        with _open(path) as handle:  # closed at once: its mapped pages would count as resident
            for theirs_name, ours_name in pairs:
                diff = (_get(handle, path, theirs_name).float() - state[ours_name].float()).abs().max().item()
                if diff > worst:
                    worst, where, who = diff, theirs_name, f"replica {other.replica} stage {other.stage_index}"
    if worst > 0:
        raise CheckpointError(f"{checkpoint}: replicas diverged — {who} differs from replica 0 by up to "
                              f"{worst:.3g} at {where}")
