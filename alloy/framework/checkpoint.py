"""`alloy.Model.fit`'s checkpoints: after an epoch, everything a fit needs to go on exactly.

Layout of CHECKPOINT_DIR/:
    epoch-00000003/model.safetensors  the module's state dict after 3 epochs (Model.load reads it)
    epoch-00000003/trainer.pt         the optimizer's state dict and every rank's torch RNG state
    epoch-00000003/fit.json           epochs done and the history so far
    epoch-00000003/manifest.json      written last: each file's size and SHA-256, the module's
                                      parameter names, dtypes and shapes, the optimizer's class
Written with the runtime's machinery (alloy.runtime.checkpoint): files go into
`epoch-N.partial/` through fsync'd temp files, the manifest last, then a rename, so a directory
named `epoch-N` is always complete; only the newest `keep_last` stay. One fit writes into a
directory at a time.

A resumed fit equals an uninterrupted one to the bit because the checkpoint holds all that an
epoch's end leaves behind: weights, optimizer state (Adam's moments and step counts, the param
groups' lr a LearningRateScheduler may have changed), history, and each rank's torch RNG state
(dropout draws from it); the shuffle is seeded per epoch. Callbacks' own state (EarlyStopping's
patience count, ModelCheckpoint's best value) is not saved: they start afresh on resume.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from alloy.errors import CheckpointError, ConfigError
from alloy.framework.job import FitRun
from alloy.framework.model import History
from alloy.runtime import checkpoint as ckpt

PREFIX = "epoch"  # the directories are epoch-N (N: epochs done), beside nothing of the runtime's
MODEL, TRAINER, STATE = "model.safetensors", "trainer.pt", "fit.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Resumed:
    """Where a resumed fit starts (its module and optimizer are already loaded)."""

    epochs_done: int
    history: History
    rng_states: tuple[torch.Tensor, ...]  # torch.get_rng_state() of each rank of the fit that saved


def save(root: Path, epochs_done: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
         history: History, rng_states: list[torch.Tensor], keep_last: int) -> Path:
    ckpt.sweep(root, prefix=PREFIX)  # no save is under way (one fit a directory): a .partial is a killed one's
    partial = ckpt.step_dir(root, epochs_done, partial=True, prefix=PREFIX)
    partial.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    # torch.save for the optimizer: its state dict is nested and shaped by the optimizer (Adam's
    # step tensors, SGD's momentum buffers that may be None, per-group settings of any type), which
    # torch round-trips exactly for every optimizer, where safetensors + JSON would need a schema
    # per optimizer. It is read back with weights_only=True: torch's restricted unpickler (tensors
    # and plain containers only), so a planted file cannot run code.
    writers = {
        MODEL: lambda path: save_file(state, str(path)),
        TRAINER: lambda path: torch.save({"optimizer": optimizer.state_dict(), "rng_states": list(rng_states)}, path),
        STATE: lambda path: path.write_text(json.dumps(
            {"epochs_done": epochs_done, "history": history.history, "epochs": history.epochs})),
    }
    digests = {name: ckpt.fsync_write(partial / name, write) for name, write in writers.items()}
    manifest = {"format": FORMAT_VERSION, "epochs_done": epochs_done, "parameters": _describe(state),
                "optimizer": type(optimizer).__name__, "world_size": len(rng_states),
                "files": {name: (partial / name).stat().st_size for name in writers}, "sha256": digests}
    return ckpt.publish(root, epochs_done, manifest, keep_last, prefix=PREFIX)


def prepare(run: FitRun, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Resumed | None:
    """Check `run.checkpoint_dir` before the fit starts; with `run.resume`, load its newest
    checkpoint into `module` and `optimizer` and say where the fit goes on from."""
    root = Path(run.checkpoint_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"checkpoint_dir {root} is a file; give a directory (it is made if missing)")
    found = ckpt.complete_checkpoints(root, PREFIX)
    if not run.resume:
        if found:  # a new fit's epoch-1 beside an old fit's epoch-5: a later resume would take the old
            raise ConfigError(f"{root} already holds checkpoints (the newest {found[-1].name}); pass resume=True "
                              "to go on from it, or choose another checkpoint_dir (nothing was overwritten)")
        return None
    if not found:
        raise CheckpointError(f"{root}: no complete checkpoint to resume from (no {PREFIX}-N directory with a "
                              "manifest); drop resume=True to start a new fit")
    return _load(found[-1], module, optimizer, run.epochs)


def _load(directory: Path, module, optimizer, epochs: int) -> Resumed:
    manifest = ckpt.read_manifest(directory)
    if manifest.get("format") != FORMAT_VERSION or "parameters" not in manifest:
        raise CheckpointError(f"{directory}: not an alloy.Model.fit checkpoint (format {manifest.get('format')})")
    mine, theirs = _describe(module.state_dict()), manifest["parameters"]
    if mine != theirs:
        name = next(n for n in [*mine, *theirs] if mine.get(n) != theirs.get(n))  # in the module's order
        raise CheckpointError(f"{directory} was written for another module: {name} is {theirs.get(name, 'absent')} "
                              f"there, {mine.get(name, 'absent')} here; resume the same architecture and dtype")
    if manifest["optimizer"] != type(optimizer).__name__:
        raise CheckpointError(f"{directory} holds {manifest['optimizer']} state, and this model compiles "
                              f"{type(optimizer).__name__}; compile with the optimizer the fit used")
    if manifest["epochs_done"] > epochs:
        raise ConfigError(f"{directory} has {manifest['epochs_done']} epochs done, more than fit(epochs={epochs}) "
                          "asks for; pass epochs (the fit's total) at least that")
    ckpt.verify_files(directory, manifest, (MODEL, TRAINER, STATE))
    try:
        state = load_file(directory / MODEL)
        trainer = torch.load(directory / TRAINER, weights_only=True)
        saved = json.loads((directory / STATE).read_text())
    except Exception as err:  # past the checksums, only a file written by something else gets here
        raise CheckpointError(f"{directory}: unreadable ({' '.join(str(err).split())[:200]})") from None
    module.load_state_dict(state)
    optimizer.load_state_dict(trainer["optimizer"])
    return Resumed(saved["epochs_done"], History(saved["history"], saved["epochs"]), tuple(trainer["rng_states"]))


def _describe(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> "float64[32, 8]": what a checkpoint must match to load into a module."""
    return {name: f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for name, t in state.items()}
