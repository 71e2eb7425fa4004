"""Per-rank checkpoint shards, written atomically, valid only once their manifest exists.

Layout of RUN_DIR/checkpoints/:
    step-00000050/rank0.safetensors   parameters (logical names) and AdamW state of rank 0's stage
    step-00000050/rank0.json          its stage, step, and the optimizer's step counts
    step-00000050/manifest.json       written last, by rank 0, once every rank's files are in
Ranks write into `step-N.partial/` (temp file, fsync, rename per file); rank 0 then writes the
manifest and renames the directory to `step-N` — so a directory named `step-N` is always
complete, and a crash leaves at most a `.partial` directory that nothing mistakes for valid (the
next save sweeps it). A checkpoint is deleted by renaming it to `.step-N.trash` first, so a kill
mid-delete never leaves a `step-N` missing files. The manifest records each file's size and
SHA-256: resume and fuse check them and name the file that does not match.
The fusion step reads exactly this layout. `alloy.Model.fit` writes its own checkpoints with
the same machinery (`fsync_write`, `publish`, `verify_files`) under the prefix `epoch` instead
of `step` (alloy.framework.checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alloy.checkpoint.io import umask
from alloy.errors import CheckpointError
from alloy.runtime.layout import RunLayout
from alloy.spec import ModelSpec

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def step_dir(root: Path, step: int, partial: bool = False, prefix: str = "step") -> Path:
    return root / (f"{prefix}-{step:08d}" + (".partial" if partial else ""))


def fsync_write(path: Path, write) -> str:
    """Write `path` through a temp file, durably; return its SHA-256 (read back: the bytes on disk)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.chmod(tmp, 0o666 & ~umask())  # safetensors creates its files 0600 whatever the umask
    digest = sha256(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    return digest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):  # 1 MiB at a time: shards can be larger than RAM
            digest.update(chunk)
    return digest.hexdigest()


def _discard(directory: Path) -> None:
    """Delete a checkpoint directory, renaming it out of `step-*` first (see the module doc)."""
    trash = directory.with_name(f".{directory.name}.trash")
    shutil.rmtree(trash, ignore_errors=True)
    directory.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def sweep(root: Path, keep_step: int | None = None, prefix: str = "step") -> None:
    """Remove what killed saves left: `.partial` directories (but `keep_step`'s) and trash. Call
    it only when no save is under way (a save's start, or a run's start)."""
    keep = step_dir(root, keep_step, partial=True, prefix=prefix) if keep_step is not None else None
    for path in root.glob(f"{prefix}-*.partial"):
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f".{prefix}-*.trash"):
        shutil.rmtree(path, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trained(model: torch.nn.Module):
    """The parameters a checkpoint holds: the trainable ones. A frozen base (LoRA) is not written:
    every start rebuilds it from the run's init_dir or seed, unchanged."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def save_rank(root: Path, step: int, rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              info: dict) -> None:
    """Write this rank's shard for the checkpoint after `step` steps."""
    directory = step_dir(root, step, partial=True)
    # Every rank is here for this step, so no other save is under way: what else is there was killed.
    sweep(root, keep_step=step)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    optimizer_steps: dict[str, float] = {}
    for name, param in _trained(model):
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}.{name}"] = state[key].detach().cpu().contiguous()
        if "step" in state:
            optimizer_steps[name] = float(state["step"])
    digest = fsync_write(directory / f"rank{rank}.safetensors", lambda p: save_file(tensors, str(p)))
    # Each rank hashes its own shard (just written, still cached); rank 0 copies it to the manifest.
    record = info | {"rank": rank, "step": step, "optimizer_steps": optimizer_steps, "sha256": digest}
    fsync_write(directory / f"rank{rank}.json", lambda p: p.write_text(json.dumps(record)))


def finalize(root: Path, step: int, spec: ModelSpec, layout: RunLayout, keep_last: int, extra: dict) -> Path:
    """Rank 0, after every rank saved: check the shards, write the manifest, publish, rotate."""
    partial = step_dir(root, step, partial=True)
    files, digests = {}, {}
    for rank in range(layout.world_size):
        for suffix in ("safetensors", "json"):
            path = partial / f"rank{rank}.{suffix}"
            if not path.is_file():
                raise CheckpointError(f"checkpoint step {step}: rank {rank} wrote no {path.name}")
            files[path.name] = path.stat().st_size
        record = partial / f"rank{rank}.json"
        digests[record.name] = sha256(record)
        # a shard written by other means than save_rank carries no hash of its own: take it here
        digests[f"rank{rank}.safetensors"] = (_read_record(record).get("sha256")
                                              or sha256(partial / f"rank{rank}.safetensors"))
    for path in partial.iterdir():  # temp files of a killed earlier try at this step (every rank is done)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.name not in files:
            path.unlink()
    manifest = {"format": FORMAT_VERSION, "step": step, "spec": spec.to_dict(), "layout": layout.to_dict(),
                "world_size": layout.world_size, "files": files, "sha256": digests} | extra
    return publish(root, step, manifest, keep_last)


def publish(root: Path, step: int, manifest: dict, keep_last: int, prefix: str = "step") -> Path:
    """Write the manifest into the finished `.partial` directory, rename it to its final name (so
    it is complete the moment it is named), and delete all but the newest `keep_last`."""
    partial = step_dir(root, step, partial=True, prefix=prefix)
    fsync_write(partial / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    final = step_dir(root, step, prefix=prefix)
    if final.exists():
        _discard(final)
    partial.rename(final)
    _fsync_dir(root)
    for old in complete_checkpoints(root, prefix)[:-keep_last]:
        _discard(old)
    return final


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({' '.join(str(err).split())[:200]})") from None


def verify_files(directory: Path, manifest: dict, names) -> None:
    """Each named file is there with the size and SHA-256 the manifest recorded (checkpoints from
    before checksums were recorded have sizes only)."""
    sizes, digests = manifest.get("files", {}), manifest.get("sha256", {})
    for name in names:
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory}: shard {name} is missing")
        if name in sizes and path.stat().st_size != sizes[name]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes but the manifest recorded "
                                  f"{sizes[name]} — truncated or overwritten")
        if name in digests and sha256(path) != digests[name]:
            raise CheckpointError(f"{path}: corrupt — its SHA-256 differs from the one the manifest recorded")


def complete_checkpoints(root: Path, prefix: str = "step") -> list[Path]:
    """Valid checkpoints, oldest first: `step-N` (`{prefix}-N`) directories holding a manifest."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{prefix}-*") if p.is_dir() and not p.name.endswith(".partial")
             and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_manifest(directory: Path) -> dict:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{directory}: unreadable manifest ({err})") from None


def check_compatible(manifest: dict, spec: ModelSpec, layout: RunLayout, where: Path) -> None:
    """A checkpoint resumes only the same model on the same layout."""
    theirs = ModelSpec.from_dict(manifest["spec"])
    if theirs != spec:
        field = next(k for k, v in spec.to_dict().items() if theirs.to_dict().get(k) != v)
        raise CheckpointError(f"{where} was written for a different model ({field}: {theirs.to_dict()[field]} "
                              f"there, {spec.to_dict()[field]} now); use another out_dir or the same model")
    if RunLayout.from_dict(manifest["layout"]).placement() != layout.placement():
        raise CheckpointError(f"{where} was written for a different plan (layers, devices or batch shares); "
                              "resume with that plan (--plan) or start a new out_dir")


def load_rank(directory: Path, rank: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore this rank's parameters and AdamW state, from files that match the manifest's
    checksums; return its JSON record."""
    verify_files(directory, read_manifest(directory), (f"rank{rank}.safetensors", f"rank{rank}.json"))
    try:
        tensors = load_file(directory / f"rank{rank}.safetensors")
        record = json.loads((directory / f"rank{rank}.json").read_text())
    except Exception as err:
        raise CheckpointError(f"{directory}: rank {rank}'s shard is unreadable ({' '.join(str(err).split())[:200]})") from None
    with torch.no_grad():
        for name, param in _trained(model):
            key = f"param.{name}"
            if key not in tensors or tensors[key].shape != param.shape:
                raise CheckpointError(f"{directory}: rank {rank}'s shard lacks {name} or has another shape")
            param.copy_(tensors[key])
            if f"exp_avg.{name}" in tensors:
                optimizer.state[param] = {
                    "step": torch.tensor(record["optimizer_steps"][name]),
                    "exp_avg": tensors[f"exp_avg.{name}"].to(param.device),
                    "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(param.device),
                }
    return record
