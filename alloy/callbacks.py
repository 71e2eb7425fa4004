"""Callbacks: checkpoint, early stopping, learning-rate schedule — hooks into `fit`.

In a multi-device fit every rank runs the callbacks with the same (all-reduced) logs, so their
decisions agree; only the chief rank (0) writes files.
"""

from __future__ import annotations

import math
import operator
from pathlib import Path
from typing import Callable

from safetensors.torch import save_file


class Callback:
    model = None  # the alloy.Model, set before training
    chief = True  # False on ranks other than 0: do not write files

    def on_train_begin(self): ...
    def on_epoch_begin(self, epoch: int): ...
    def on_batch_end(self, step: int): ...
    def on_epoch_end(self, epoch: int, logs: dict): ...
    def on_train_end(self): ...


class CallbackList:
    def __init__(self, callbacks, model, chief: bool):
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            callback.model, callback.chief = model, chief

    def __getattr__(self, hook: str):
        def call(*args):
            for callback in self.callbacks:
                getattr(callback, hook)(*args)
        return call


def _better(monitor: str, mode: str) -> Callable[[float, float], bool]:
    if mode == "auto":
        mode = "max" if any(k in monitor for k in ("acc", "f1")) else "min"
    # operator's functions, not lambdas: a multi-device fit pickles its callbacks for every rank
    return operator.gt if mode == "max" else operator.lt


class ModelCheckpoint(Callback):
    """Save the module's weights (safetensors) after an epoch; with save_best_only, only when
    `monitor` improved."""

    def __init__(self, path: str | Path, monitor: str = "val_loss", save_best_only: bool = True, mode: str = "auto"):
        self.path, self.monitor, self.save_best_only = Path(path), monitor, save_best_only
        self.better = _better(monitor, mode)
        self.best: float | None = None
        self.saved_epochs: list[int] = []

    def on_epoch_end(self, epoch, logs):
        value = logs.get(self.monitor)
        if self.save_best_only and value is not None and self.best is not None and not self.better(value, self.best):
            return
        if value is not None:
            self.best = value
        if self.chief:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.module.state_dict().items()}
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            save_file(state, str(tmp))
            tmp.replace(self.path)
        self.saved_epochs.append(epoch)


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by `min_delta` for `patience` epochs."""

    def __init__(self, monitor: str = "val_loss", patience: int = 2, min_delta: float = 0.0, mode: str = "auto",
                 restore_best_weights: bool = False):
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.better = _better(monitor, mode)
        self.restore_best_weights = restore_best_weights
        self.best, self.wait, self.stopped_epoch, self.best_state = None, 0, None, None

    def on_epoch_end(self, epoch, logs):
        value = logs.get(self.monitor)
        if value is None:
            return
        improved = self.best is None or self.better(value, self.best) and abs(value - self.best) > self.min_delta
        if improved:
            self.best, self.wait = value, 0
            if self.restore_best_weights:
                self.best_state = {k: v.detach().clone() for k, v in self.model.module.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.best_state is not None:
                self.model.module.load_state_dict(self.best_state)


class LearningRateScheduler(Callback):
    """Set the learning rate at each epoch's start: schedule(epoch, lr) -> new lr."""

    def __init__(self, schedule: Callable[[int, float], float]):
        self.schedule = schedule
        self.rates: list[float] = []

    def on_epoch_begin(self, epoch):
        groups = self.model.optimizer.param_groups
        rate = float(self.schedule(epoch, groups[0]["lr"]))
        if not math.isfinite(rate) or rate < 0:
            from alloy.errors import ConfigError
            raise ConfigError(f"the learning-rate schedule gave {rate} at epoch {epoch}")
        for group in groups:
            group["lr"] = rate
        self.rates.append(rate)


__all__ = ["Callback", "EarlyStopping", "LearningRateScheduler", "ModelCheckpoint"]
