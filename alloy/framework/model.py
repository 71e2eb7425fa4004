"""`alloy.Model`: compile / fit / evaluate / predict for any torch module, on the planned devices.

The seed's workflow, unchanged in shape:

    model = alloy.Model(nn.Sequential(Embedding(...), LSTM(...), Dense(2)))
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=10, batch_size=32)
    loss, accuracy = model.evaluate(x_test, y_test)

With several devices (a cluster file, or "auto" finding more than one), `fit` runs data
parallel on the Transformer runtime's engine: one process per device, started by its launcher
(alloy.runtime.launch; the ranks are alloy.framework.worker), each batch split by measured
device speed with the planner's share rule (alloy.plan.search.largest_remainder), per-sample
losses weighted by 1 / global batch, and the gradients summed by the runtime's bucketed
all-reduce (alloy.runtime.sync.allreduce_grads), so the summed gradient is exactly the
single-device one — the same exactness rule as the Transformer runtime. A float64 module
(`module.double()`, given float64 inputs) trains in float64 in every process, losses included.

Checkpoints and resume, as `alloy train` has them:

    model.fit(x, y, epochs=10, checkpoint_dir="ckpt/")               # epoch-N/ after every epoch
    model.fit(x, y, epochs=10, checkpoint_dir="ckpt/", resume=True)  # after a crash: goes on

A checkpoint (alloy.framework.checkpoint) holds the weights, the optimizer's state, the history
and the ranks' RNG states, written atomically with the runtime's machinery; a fit resumed from
epoch k gives the same weights and history, to the bit, as one that never stopped. The settings
every rank runs are one typed value (alloy.framework.job: FitRun, FitJob).

Pipeline parallel, for an nn.Sequential (alloy.framework.pipeline):

    model.fit(x, y, epochs=10, parallelism="pipeline", microbatches=4)

cuts its children into contiguous stages, one per device: each child's forward + backward is
timed on a micro-batch, divided by each device's speed, and split by the planner's partition
(alloy.plan.search.bottleneck_cuts). Every batch runs GPipe over `microbatches` (default: one per
stage; a batch of fewer rows, one a row), its losses weighted as the data-parallel ones, so the
float64 weights equal a single process's up to float64 rounding (the micro-batches sum the
gradient in another order). Losses, metrics and validation come from the last stage; after every
epoch rank 0 gathers every stage's weights and optimizer state, so callbacks, checkpoints, resume
and this Model see the whole model. Dropout in a pipeline draws from its stage's process, so it
draws other numbers than a single process would.
"""

from __future__ import annotations

import json
import math
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from alloy.callbacks import Callback, CallbackList
from alloy.data import as_inputs
from alloy.errors import ConfigError
from alloy.framework.job import FitJob, FitRun
from alloy.framework.registry import make_loss, make_metric, make_optimizer
from alloy.plan.search import largest_remainder

if TYPE_CHECKING:
    from alloy.framework.checkpoint import Resumed
    from alloy.framework.pipeline import Pipeline

PARALLELISMS = ("data", "pipeline")


@dataclass
class History:
    history: dict[str, list[float]] = field(default_factory=dict)
    epochs: list[int] = field(default_factory=list)

    def append(self, epoch: int, logs: dict[str, float]) -> None:
        self.epochs.append(epoch)
        for key, value in logs.items():
            self.history.setdefault(key, []).append(value)


@dataclass
class _Rank:
    rank: int = 0
    weights: tuple[float, ...] = (1.0,)  # relative throughput of every rank
    pipeline: Pipeline | None = None  # a pipeline-parallel fit: this rank's stage; None: data parallel

    @property
    def world(self) -> int:
        return len(self.weights)


class Model:
    def __init__(self, module: nn.Module, devices: Any = "auto"):
        if not isinstance(module, nn.Module):
            raise ConfigError(f"alloy.Model wraps a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.devices = devices
        self.compiled: dict | None = None
        self.stop_training = False
        self.history: History | None = None

    # ---- compile ---------------------------------------------------------------------------

    def compile(self, optimizer: Any = "adam", loss: Any = "sparse_categorical_crossentropy",
                metrics: Sequence[Any] = (), lr: float | None = None) -> "Model":
        make_loss(loss)
        [make_metric(m) for m in metrics]  # validate names now, not at the first batch
        self.optimizer = make_optimizer(optimizer, self.module.parameters(), lr)
        self.compiled = {"optimizer": optimizer, "loss": loss, "metrics": list(metrics), "lr": lr}
        return self

    def _need_compiled(self) -> dict:
        if self.compiled is None:
            raise ConfigError("call model.compile(optimizer=..., loss=..., metrics=[...]) first")
        return self.compiled

    # ---- fit -------------------------------------------------------------------------------

    def fit(self, x, y=None, *, epochs: int = 1, batch_size: int = 32, validation_data=None,
            callbacks: Sequence[Callback] = (), shuffle: bool = True, seed: int = 0, verbose: int = 1,
            checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1, resume: bool = False,
            parallelism: str = "data", microbatches: int | None = None) -> History:
        """Train for `epochs` in all. With `checkpoint_dir`, save a checkpoint every
        `checkpoint_every` epochs and after the last; with `resume`, first load the newest one
        there and run only the epochs it has not done. Over several devices, `parallelism` "data"
        splits each batch over them, "pipeline" an nn.Sequential's children (alloy.framework.pipeline),
        each batch in `microbatches` (default: one per device)."""
        compiled = self._need_compiled()
        if parallelism not in PARALLELISMS:
            raise ConfigError(f"parallelism must be one of {', '.join(map(repr, PARALLELISMS))}, got {parallelism!r}")
        if parallelism == "data" and microbatches is not None:
            raise ConfigError("microbatches splits a pipeline's batches; pass parallelism='pipeline' with it")
        inputs, targets = as_inputs(x, y, what="training data")
        run = FitRun(epochs=epochs, batch_size=batch_size, shuffle=shuffle, seed=seed, resume=resume,
                     checkpoint_dir=str(Path(checkpoint_dir).absolute()) if checkpoint_dir is not None else None,
                     checkpoint_every=checkpoint_every)
        self._check_labels(inputs, targets, compiled["loss"])
        val = as_inputs(*validation_data, what="validation data") if validation_data is not None else None
        weights, profiles = self._device_weights()
        stages = None  # a pipeline's (cuts, micro-batches)
        if parallelism == "pipeline":
            from alloy.framework.pipeline import plan_stages

            stages = plan_stages(self.module, inputs, targets, compiled["loss"], weights, batch_size, microbatches)
        start = None
        if run.checkpoint_dir is not None:
            from alloy.framework import checkpoint

            start = checkpoint.prepare(run, self.module, self.optimizer)
        bar = _ProgressBar() if verbose else None
        try:
            if len(weights) == 1:
                self.history = _fit_loop(self, inputs, targets, val, list(callbacks), run, _Rank(), bar, start)
            else:
                self.history = self._fit_parallel(inputs, targets, val, list(callbacks), run, weights, profiles, bar,
                                                  start, stages)
        finally:
            if bar:
                bar.stop()
        return self.history

    def _device_weights(self) -> tuple[tuple[float, ...], list]:
        """Relative fp32 matmul speed of each device the fit runs on (one entry: one process)."""
        from alloy.devices import Inventory

        devices = self.devices
        if devices in ("cpu", None):
            return (1.0,), [None]
        if isinstance(devices, (str, Path)) and devices != "auto":
            devices = Inventory.load(devices)
        if devices == "auto":
            from alloy.devices import profile

            devices = profile()
        if not isinstance(devices, Inventory):
            raise ConfigError("devices must be 'auto', 'cpu', a cluster JSON path or an alloy.devices.Inventory")
        cpus = [d for d in devices.devices if d.kind == "cpu"]
        if len(cpus) != len(devices.devices):
            raise ConfigError("multi-device fit runs on CPU devices (and emulated CPU slices) for now")
        return tuple(d.flops("fp32") for d in cpus), list(cpus)

    def _fit_parallel(self, inputs, targets, val, callbacks, run: FitRun, weights, profiles, bar,
                      start: Resumed | None, stages: tuple[tuple[int, ...], int] | None) -> History:
        """One rank per device (alloy.framework.worker), started by the runtime's launcher; the
        module, its optimizer's state, the data, the callbacks and where a resumed fit starts go
        to the ranks in a torch.save file beside the job. Rank 0 hands back the weights, the
        history and the optimizer's state, so this Model ends as a single-process fit leaves it.
        `stages`: a pipeline's (cuts, micro-batches); None: data parallel."""
        from alloy.framework import worker
        from alloy.runtime.launch import LaunchError, launch

        out_dir = Path(tempfile.mkdtemp(prefix="alloy-fit-"))
        failed = False
        try:
            job = FitJob(out_dir=str(out_dir), payload=str(out_dir / "payload.pt"), run=run, weights=tuple(weights),
                         profiles=tuple(p.model_dump(mode="json") if p else None for p in profiles),
                         main=worker.main_module_data(),
                         torch_seeds=tuple(torch.randint(2**62, (len(weights),)).tolist()),
                         metrics_path=str(out_dir / "progress.jsonl") if bar else None,
                         stage_cuts=stages[0] if stages else None, micro_batches=stages[1] if stages else 1)
            try:
                torch.save(dict(model=self, inputs=inputs, targets=targets, val=val, callbacks=callbacks,
                                optimizer_state=self.optimizer.state_dict(), start=start), job.payload)
            except (pickle.PicklingError, AttributeError, TypeError) as err:  # a lambda, a local class...
                raise ConfigError(f"a multi-device fit pickles the module, its optimizer and the callbacks for "
                                  f"each process, and this one cannot be: {err}") from None
            launch(job, len(weights), timeout_s=math.inf, progress=bar, worker_module="alloy.framework.worker")
            state = load_file(out_dir / worker.STATE)
            saved = json.loads((out_dir / worker.HISTORY).read_text())
            # rank 0's optimizer state, from this fit's own private directory: tensors and containers only
            optimizer_state = torch.load(out_dir / worker.OPTIMIZER, weights_only=True)
        except LaunchError:
            failed = True
            raise
        finally:  # a failed fit keeps the ranks' log, which its error names
            for path in out_dir.iterdir():
                if not (failed and path.name.startswith("torchrun-")):
                    path.unlink()
            if not failed:
                out_dir.rmdir()
        with torch.no_grad():
            for name, tensor in self.module.state_dict().items():
                tensor.copy_(state[name])
        self.optimizer.load_state_dict(optimizer_state)
        return History(saved["history"], saved["epochs"])

    def _check_labels(self, inputs, targets, loss) -> None:
        _, class_labels = make_loss(loss)
        if not class_labels:
            return
        if targets.dtype.is_floating_point and not torch.equal(targets, targets.round()):
            raise ConfigError("labels must be class indices (integers) for a classification loss")
        with torch.no_grad():
            was_training = self.module.training
            self.module.eval()
            outputs = self.module(*(t[:1] for t in inputs))
            self.module.train(was_training)
        classes = outputs.shape[-1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            bad = low if low < 0 else high
            raise ConfigError(f"label {bad} is outside the model's {classes} classes (0..{classes - 1})")

    # ---- evaluate / predict ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x, y=None, *, batch_size: int = 256, return_dict: bool = False, verbose: int = 0):
        compiled = self._need_compiled()
        inputs, targets = as_inputs(x, y, what="evaluation data")
        logs = _evaluate(self.module, inputs, targets, compiled, batch_size, _Rank())
        return logs if return_dict else list(logs.values())

    @torch.no_grad()
    def predict(self, x, *, batch_size: int = 256) -> torch.Tensor:
        inputs, _ = as_inputs(x, None, what="prediction data")
        self.module.eval()
        outputs = [self.module(*(t[i : i + batch_size] for t in inputs))
                   for i in range(0, len(inputs[0]), batch_size)]
        return torch.cat(outputs)

    # ---- save / load -----------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Weights as safetensors, plus the compile settings as JSON beside them."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(path / "model.safetensors"))
        settings = {k: v for k, v in (self.compiled or {}).items() if isinstance(v, (str, int, float, list, type(None)))}
        (path / "alloy_model.json").write_text(json.dumps({"compile": settings}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path, module: nn.Module, devices: Any = "auto") -> "Model":
        """Weights from `save` into `module` (same architecture); compiled again if settings were saved."""
        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise ConfigError(f"{path}: no model.safetensors (saved by alloy.Model.save)")
        state = load_file(path / "model.safetensors")
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"{path}: weights do not fit this module (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model = cls(module, devices)
        settings = json.loads((path / "alloy_model.json").read_text()).get("compile") if (path / "alloy_model.json").is_file() else None
        if settings:
            model.compile(**settings)
        return model


def _batches(count: int, batch_size: int, order: torch.Tensor):
    for start in range(0, count, batch_size):
        yield order[start : start + batch_size]


def _shares(rows: int, weights: Sequence[float]) -> list[int]:
    """The planner's batch shares (alloy.plan.search.largest_remainder: each rank at least one
    row, the rest by speed); a batch with fewer rows than ranks gives one row to each of the
    fastest ranks, none to the others."""
    shares = largest_remainder(rows, list(weights))
    if shares is None:
        fastest = sorted(range(len(weights)), key=lambda k: (-weights[k], k))[:rows]
        shares = [int(k in fastest) for k in range(len(weights))]
    return shares


def _my_rows(index: torch.Tensor, rank: _Rank) -> torch.Tensor:
    if rank.world == 1:
        return index
    shares = _shares(len(index), rank.weights)
    start = sum(shares[: rank.rank])
    return index[start : start + shares[rank.rank]]


def _all_reduce(tensor: torch.Tensor, rank: _Rank) -> torch.Tensor:
    """Sum a metric's or the loss's running totals over the ranks (gradients go by _sync_grads)."""
    if rank.world > 1:
        dist.all_reduce(tensor)
    return tensor


def _sync_grads(module: nn.Module, rank: _Rank) -> None:
    """Sum the ranks' gradients: the runtime's bucketed all-reduce, in backward order."""
    if rank.world > 1:
        from alloy.runtime.sync import allreduce_grads

        allreduce_grads(reversed(list(module.parameters())))


def _tally(outputs, targets, loss_fn, metrics, totals: torch.Tensor) -> torch.Tensor:
    """The batch's per-sample losses; their sum and count go into `totals`, the batch into the metrics."""
    losses = loss_fn(outputs, targets)
    totals += torch.tensor([losses.sum().item(), len(targets)], dtype=torch.float64)
    for metric in metrics:
        metric.update(outputs.detach(), targets, losses.detach())
    return losses


def _data_parallel_step(module, inputs, targets, index, loss_fn, metrics, totals, rank: _Rank) -> None:
    """This rank's share of the global batch `index`, forward and backward; gradients summed over the ranks."""
    mine = _my_rows(index, rank)
    if len(mine):
        losses = _tally(module(*(t[mine] for t in inputs)), targets[mine], loss_fn, metrics, totals)
        (losses.sum() / len(index)).backward()  # exact share of the global batch's mean
    _sync_grads(module, rank)


def _fit_loop(model: Model, inputs, targets, val, callbacks, run: FitRun, rank: _Rank, report=None,
              start: Resumed | None = None) -> History:
    """The training loop every rank runs (a single device is the one-rank case). `report`, if
    given, gets a progress record after every step and at every epoch's end (_ProgressBar).
    `start`: a resumed fit's checkpoint (its weights and optimizer state already loaded)."""
    module, optimizer, compiled = model.module, model.optimizer, model.compiled
    loss_fn, _ = make_loss(compiled["loss"])
    history = History({k: list(v) for k, v in start.history.history.items()}, list(start.history.epochs)) \
        if start else History()
    # Dropout draws from torch's global generator: this rank's, as the checkpoint left it. A fit
    # resumed on another number of processes keeps the one it has (its batch split differs anyway).
    if start and len(start.rng_states) == rank.world:
        torch.set_rng_state(start.rng_states[rank.rank])
    chief = rank.rank == 0
    hooks = CallbackList(callbacks, model, chief)
    model.stop_training = False
    count = len(targets)
    steps_per_epoch = math.ceil(count / run.batch_size)
    hooks.on_train_begin()
    for epoch in range(start.epochs_done if start else 0, run.epochs):
        hooks.on_epoch_begin(epoch)
        module.train()
        generator = torch.Generator().manual_seed(run.seed * 1_000_003 + epoch)
        order = torch.randperm(count, generator=generator) if run.shuffle else torch.arange(count)
        metrics = [make_metric(m) for m in compiled["metrics"]]
        totals = torch.zeros(2, dtype=torch.float64)  # loss sum, samples
        for step, index in enumerate(_batches(count, run.batch_size, order)):
            optimizer.zero_grad(set_to_none=True)
            if rank.pipeline:
                rank.pipeline.train_step(index, inputs[0], targets, loss_fn, metrics, totals)
            else:
                _data_parallel_step(module, inputs, targets, index, loss_fn, metrics, totals, rank)
            optimizer.step()
            hooks.on_batch_end(step)
            if report:
                report({"epoch": epoch, "epochs": run.epochs, "step": step + 1, "steps": steps_per_epoch,
                        "loss": float(totals[0] / max(1, totals[1]))})
        if rank.pipeline:
            logs = rank.pipeline.logs(totals, metrics)
            if val is not None:
                logs |= {f"val_{k}": v for k, v in rank.pipeline.evaluate(val[0][0], val[1], compiled, 256).items()}
            rank.pipeline.gather(model)  # rank 0's Model whole again, for the callbacks and the checkpoint
        else:
            logs = _logs(totals, metrics, rank)
            if val is not None:
                logs |= {f"val_{k}": v for k, v in _evaluate(module, *val, compiled, 256, rank).items()}
        if report:
            report({"epoch": epoch, "epochs": run.epochs, "steps": steps_per_epoch, "logs": logs})
        history.append(epoch, logs)
        hooks.on_epoch_end(epoch, logs)
        last = epoch + 1 == run.epochs or model.stop_training
        if run.checkpoint_dir is not None and ((epoch + 1) % run.checkpoint_every == 0 or last):
            _save_checkpoint(model, run, rank, history, epoch + 1)
        if model.stop_training:
            break
    hooks.on_train_end()
    return history


def _save_checkpoint(model: Model, run: FitRun, rank: _Rank, history: History, epochs_done: int) -> None:
    """Every rank hands in its RNG state; rank 0 writes, its weights and optimizer state being
    every rank's (the gradients they step on are the same all-reduced sums), or in a pipeline
    every stage's (gathered at the epoch's end)."""
    from alloy.framework import checkpoint

    rng_states = [torch.get_rng_state()]
    if rank.world > 1:
        rng_states = [None] * rank.world
        dist.all_gather_object(rng_states, torch.get_rng_state())
    if rank.rank == 0:
        checkpoint.save(Path(run.checkpoint_dir), epochs_done, model.module, model.optimizer, history, rng_states,
                        run.keep_last)


def _logs(totals, metrics, rank) -> dict[str, float]:
    _all_reduce(totals, rank)
    logs = {"loss": float(totals[0] / totals[1])}
    for metric in metrics:
        _all_reduce(metric.sums, rank)
        logs[metric.name] = metric.result()
    return logs


@torch.no_grad()
def _evaluate(module, inputs, targets, compiled, batch_size, rank: _Rank) -> dict[str, float]:
    loss_fn, _ = make_loss(compiled["loss"])
    metrics = [make_metric(m) for m in compiled["metrics"]]
    totals = torch.zeros(2, dtype=torch.float64)
    was_training = module.training
    module.eval()
    for index in _batches(len(targets), batch_size, torch.arange(len(targets))):
        mine = _my_rows(index, rank)
        if not len(mine):
            continue
        _tally(module(*(t[mine] for t in inputs)), targets[mine], loss_fn, metrics, totals)
    module.train(was_training)
    return _logs(totals, metrics, rank)


class _ProgressBar:
    """The fit's progress bar (rich), drawn from _fit_loop's records: in this process, or from
    rank 0's metrics file, which alloy.runtime.launch follows while the ranks run."""

    def __init__(self):
        self.progress, self.tasks = None, {}

    def __call__(self, record: dict) -> None:
        if self.progress is None:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[status]}"), TimeRemainingColumn())
            self.progress.start()
        epoch = record["epoch"]
        if epoch not in self.tasks:
            self.tasks[epoch] = self.progress.add_task(f"epoch {epoch + 1}/{record['epochs']}",
                                                       total=record["steps"], status="")
        if "logs" in record:
            status = "  ".join(f"{k} {v:.4f}" for k, v in record["logs"].items())
            self.progress.update(self.tasks[epoch], status=status)
        else:
            self.progress.update(self.tasks[epoch], completed=record["step"], status=f"loss {record['loss']:.4f}")

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
