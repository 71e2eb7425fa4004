"""`TrainJob`: what every training worker runs, typed, with each default written here once.

`alloy.runtime.run.job_document` builds one, `alloy.runtime.launch` writes `to_dict()` beside
the job's outputs as JSON, and each worker reads it back with `from_dict()`. In that JSON the
nested values (spec, layout, data, optim...) are plain dicts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Any

from alloy.errors import ConfigError
from alloy.runtime.data import DataSource
from alloy.runtime.engine import OptimConfig
from alloy.runtime.layout import RunLayout
from alloy.spec import ModelSpec


class JobError(ConfigError):
    """A job document that does not describe its job (a TrainJob, an alloy.Model.fit job): an
    unknown or missing key."""


def check_keys(cls, doc: dict[str, Any]) -> None:
    """Refuse a document for the dataclass `cls` with a key it does not know, or without one it
    needs (a field with no default)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(doc) - names)
    if unknown:
        raise JobError(f"the job has unknown key(s) {', '.join(unknown)}; a {cls.__name__}'s keys are "
                       f"{', '.join(sorted(names))}")
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(required - set(doc))
    if missing:
        raise JobError(f"the job lacks the key(s) {', '.join(missing)}")


@dataclass(frozen=True, kw_only=True)
class Checkpointing:
    dir: str
    every: int  # save after every `every` steps, and after the last
    keep_last: int  # complete checkpoints kept; older ones are deleted


@dataclass(frozen=True, kw_only=True)
class TrainJob:
    spec: ModelSpec
    layout: RunLayout
    steps: int  # the run's total optimizer steps (the learning-rate schedule's length)
    seq_len: int
    out_dir: str  # each rank's step records and final shard land here
    data: DataSource = DataSource()
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    pipeline_schedule: str = "1f1b"
    devices: dict[str, dict] = field(default_factory=dict)  # DeviceProfile dumps by name; empty: plain CPU ranks
    init_dir: str | None = None  # start from these weights rather than a seeded init
    threads: int | None = None  # torch threads per rank; None: the node's cores shared among its CPU ranks
    # every collective's timeout. 600 s is run()'s (and so `alloy train`'s floor); job_document and
    # the worker used to say 300.
    timeout_s: float = 600.0
    predicted_step_s: float | None = None
    predicted_terms: dict[str, float] | None = None  # the plan's compute_s / allreduce_s / optimizer_s
    grad_accum: int = 1
    precision: str = "fp32"  # the compute dtype of the forward and backward
    param_dtype: str = "fp32"  # the dtype parameters are held in
    activation_checkpointing: bool = False
    lora: dict | None = None  # an alloy.train.config LoraConfig dump; None: full fine-tuning
    val_data: DataSource | None = None
    eval_every: int = 50
    eval_batches: int = 2
    checkpoint: Checkpointing | None = None
    resume: bool = False  # go on from the last complete checkpoint
    stop_at: int | None = None  # stop after this step, as if interrupted
    metrics_path: str | None = None  # rank 0 appends one JSON line per step
    max_restarts: int = 0  # torchrun restarts every rank this often after one dies

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: the nested values as plain dicts."""
        doc = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return doc | {"spec": self.spec.to_dict(), "layout": self.layout.to_dict(), "data": asdict(self.data),
                      "optim": asdict(self.optim) | {"betas": list(self.optim.betas)},
                      "val_data": asdict(self.val_data) if self.val_data else None,
                      "checkpoint": asdict(self.checkpoint) if self.checkpoint else None}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> TrainJob:
        check_keys(cls, doc)
        nested = {"spec": ModelSpec.from_dict(doc["spec"]), "layout": RunLayout.from_dict(doc["layout"])}
        if "data" in doc:
            nested["data"] = DataSource(**doc["data"])
        if "optim" in doc:  # JSON has no tuples
            betas = {"betas": tuple(doc["optim"]["betas"])} if "betas" in doc["optim"] else {}
            nested["optim"] = OptimConfig(**doc["optim"] | betas)
        if doc.get("val_data") is not None:
            nested["val_data"] = DataSource(**doc["val_data"])
        if doc.get("checkpoint") is not None:
            nested["checkpoint"] = Checkpointing(**doc["checkpoint"])
        return cls(**doc | nested)
