"""Fuse a distributed run's checkpoint shards into one standard model (seed step 4).

Before anything is written, every shard is checked against the manifest: present, the size
the manifest recorded (not truncated), and holding exactly its stage's parameters with the
shapes the manifest's model implies (so a manifest from another model is caught); the layout
must tile every layer exactly once. Then it streams: one stage's shard is read, converted to
the family's HF names and written as one output file before the next is read, and replicas
are compared with it tensor by tensor — so a model larger than RAM still fuses. Output goes to
a staging directory renamed into place only when complete; it never replaces the run itself,
nor anything but a previous model, and that only with `overwrite` (--force).

A LoRA run's checkpoints hold the adapters only (alloy.runtime.checkpoint): its frozen base is the
HF directory it fine-tuned (run.json's init_dir) or, for a run from scratch, drawn from its seed.
With `merge_lora`, each stage of that base is read and its adapters folded in (W += alpha/rank * B A)
in place before the stage is written, so memory stays one stage of the base plus one copy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from alloy.checkpoint.io import (SIDE_FILES, TOKENIZER_FILES, check_output_dir, hf_tensors, staged_dir, staging_path,
                                torch_dtype, write_hf_config)
from alloy.errors import AlloyError, CheckpointError, ConfigError
from alloy.model import Transformer
from alloy.model.lora import LoraConfig, apply_lora, merge_lora as fold_adapters
from alloy.runtime.checkpoint import complete_checkpoints, read_manifest, step_dir, verify_files
from alloy.runtime.layout import RankInfo, RunLayout
from alloy.spec import ModelSpec

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


def expected_params(spec: ModelSpec, info: RankInfo, lora: dict | None = None) -> dict[str, tuple[int, ...]]:
    """The parameter names and shapes a rank's shard holds: its stage's trainable parameters, which
    with `lora` are the adapters alone (built on the meta device: no memory)."""
    stage = info.stage
    with torch.device("meta"):
        model = Transformer(spec, stage.layers, embed=stage.has_embed, head=stage.has_head)
        if lora:
            apply_lora(model, LoraConfig(**lora))
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


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
        _check_shard_holds_its_stage(checkpoint / f"rank{info.rank}.safetensors", spec, info, manifest.get("lora"))
    return spec, layout


def _check_shard_holds_its_stage(path: Path, spec: ModelSpec, info: RankInfo, lora: dict | None) -> None:
    first, last = info.stage.layers
    where = f"{path}: replica {info.replica} stage {info.stage_index} (layers [{first}, {last}))"
    wanted = expected_params(spec, info, lora)
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
             format: str = "hf", overwrite: bool = False, merge_lora: bool = False) -> Path:
    """Write the run's checkpoint (latest complete one, or `step`) as one model at `out`: an HF
    directory, a GGUF file or an ONNX file. A previous output there is replaced only with `overwrite`.
    A LoRA run needs `merge_lora`: its adapters are folded into its base model, which is written."""
    from alloy.fuse.export import check_output_file, export_model

    if format not in FORMATS:
        raise CheckpointError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    if format == "hf":
        target = check_output_dir(out, overwrite=overwrite, inputs=[run_dir])
    else:
        target = check_output_file(out, format, overwrite=overwrite)
    checkpoint = find_checkpoint(run_dir, step)
    lora = read_manifest(checkpoint).get("lora")
    if lora and not merge_lora:
        raise ConfigError(f"{run_dir} trained a LoRA adapter (its checkpoints hold only the adapters; final/ holds "
                          "it in PEFT's format); pass --merge-lora (merge_lora=True) to write the merged model")
    if merge_lora and not lora:
        raise ConfigError(f"{run_dir} trained the full model, not a LoRA adapter; fuse it without --merge-lora")
    spec, layout = check_checkpoint(checkpoint)
    base = _lora_base(run_dir, spec, lora) if lora else None
    if base is not None and base.init_dir is not None:
        _check_apart(target, base.init_dir)
    out_dtype = torch_dtype(dtype)
    if format == "hf":
        return _fuse_hf(run_dir, checkpoint, spec, layout, target, out_dtype, base)
    # GGUF/ONNX read the fused HF directory layer by layer; it lives on disk, not in RAM, in a
    # scratch folder named like a staging one, so that it is swept if this process is killed.
    scratch = staging_path(target)
    scratch.mkdir()
    try:
        hf_dir = _fuse_hf(run_dir, checkpoint, spec, layout, scratch / "hf", out_dtype, base)
        return export_model(hf_dir, target, format=format, dtype=dtype, overwrite=overwrite)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class LoraBase:
    """A LoRA run's frozen base, which its checkpoints do not hold: the HF directory it fine-tuned,
    or (init_dir None) the seed its workers drew it from."""

    lora: dict  # the run's lora section: rank, alpha, dropout, targets
    init_dir: Path | None
    seed: int

    def merged_stage(self, spec: ModelSpec, info: RankInfo,
                     adapters: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The stage's base weights with `adapters` (its shard's lora_A / lora_B) folded in, in fp32
        as the workers held them (a QLoRA base dequantized: the weights its adapters trained on)."""
        from alloy.runtime.build import build_stage_model

        stage = info.stage  # built as the run's workers built it (QLoRA: quantized layer by layer)
        model = build_stage_model(spec, stage.layers, embed=stage.has_embed, head=stage.has_head,
                                  init_dir=str(self.init_dir) if self.init_dir is not None else None,
                                  seed=self.seed, lora=self.lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:  # the adapters; their names and shapes were checked with the shard
                    param.copy_(adapters[name])
        return _dequantized(fold_adapters(model)).state_dict()


@torch.no_grad()
def _dequantized(model: Transformer) -> Transformer:
    """QLoRA's frozen linears without an adapter back as plain fp32 nn.Linears; in place."""
    from alloy.quant.linear import QuantLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.copy_(module.dequantized())
            if module.bias is not None:
                linear.bias.copy_(module.bias)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear.requires_grad_(False))
    return model


def _lora_base(run_dir: Path, spec: ModelSpec, lora: dict) -> LoraBase:
    """Where the run's base is, from its run.json, checked to be the model the run trained."""
    from alloy.spec import read_config

    record = run_dir / "run.json"
    if not record.is_file():
        raise CheckpointError(f"{run_dir}: no run.json, which names the base model its LoRA adapters were trained on")
    try:
        saved = json.loads(record.read_text())
        init_dir, seed = saved.get("init_dir"), int(saved["config"].get("seed", 0))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError) as err:
        raise CheckpointError(f"{record}: unreadable ({_one_line(err)})") from None
    if init_dir is None:
        return LoraBase(lora, None, seed)
    base = Path(init_dir)
    if not base.is_dir():  # perhaps relative to another working directory: final/ names it resolved
        base = _adapter_base(run_dir / "final" / "adapter_config.json")
        if base is None:
            raise CheckpointError(f"the base model of {run_dir}, {init_dir}, is gone; put it back there to merge "
                                  "the run's LoRA adapters into it")
    theirs = ModelSpec.from_hf_config(read_config(base / "config.json"))
    if theirs != spec:
        field = next(k for k, v in spec.to_dict().items() if theirs.to_dict().get(k) != v)
        raise CheckpointError(f"{base} is no longer the base model {run_dir} trained on ({field}: "
                              f"{theirs.to_dict().get(field)} there, {spec.to_dict()[field]} in the run)")
    return LoraBase(lora, base, seed)


def _check_apart(target: Path, base_dir: Path) -> None:
    """The output neither replaces the base nor lands inside it (a GGUF file in a model folder is
    what alloy.load would then read as that model)."""
    out, base = target.resolve(), base_dir.resolve()
    if out == base or base in out.parents or out in base.parents:
        raise ConfigError(f"{target}: is, holds or is inside the base model {base_dir}; write the merged model "
                          "somewhere else")


def _adapter_base(adapter_config: Path) -> Path | None:
    try:
        named = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return Path(named) if isinstance(named, str) and Path(named).is_dir() else None


def _fuse_hf(run_dir: Path, checkpoint: Path, spec: ModelSpec, layout: RunLayout, target: Path,
             out_dtype: torch.dtype | None, base: LoraBase | None = None) -> Path:
    ranks = layout.ranks()
    stages = [info for info in ranks if info.replica == 0]
    lora = base.lora if base is not None else None
    with staged_dir(target) as staging:
        weight_map: dict[str, str] = {}
        total_bytes = 0
        for n, info in enumerate(stages, 1):
            path = checkpoint / f"rank{info.rank}.safetensors"
            with _open(path) as handle:
                state = {name: _get(handle, path, name) for name in expected_params(spec, info, lora)}
            _check_replicas_agree(checkpoint, spec, state, ranks, info, lora)
            if base is not None:
                state = base.merged_stage(spec, info, state)
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
        if base is not None and base.init_dir is not None:  # the base's tokenizer, generation config, template
            for name in SIDE_FILES:
                if (base.init_dir / name).is_file():
                    shutil.copy(base.init_dir / name, staging / name)
        for name in TOKENIZER_FILES:  # the tokenizer the run trained with (the base's own, when it has one)
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, staging / name)
    return target


def _check_replicas_agree(checkpoint: Path, spec: ModelSpec, state: dict, ranks: list[RankInfo],
                          info: RankInfo, lora: dict | None = None) -> None:
    """Data-parallel replicas must hold identical weights, and a tied head's copy must equal the
    embeddings; report the largest difference if not. Compared one tensor at a time."""
    worst, where, who = 0.0, "", ""
    for other in ranks:
        if other.rank == info.rank:
            continue
        theirs = set(expected_params(spec, other, lora))
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
