"""What a multi-device `alloy.Model.fit` hands its ranks, typed: `FitRun` (the loop's settings,
which a single-process fit runs too) and `FitJob` (a rank's whole job).

`Model.fit` builds them: its own signature holds the user-facing defaults, so the fields it sets
have none here. `alloy.runtime.launch` writes `FitJob.to_dict()` beside the job's outputs as JSON
and each rank (alloy.framework.worker) reads it back with `from_dict()`, which refuses an unknown
or missing key by name, as the runtime's TrainJob does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from alloy.errors import ConfigError
from alloy.runtime.job import check_keys


@dataclass(frozen=True, kw_only=True)
class FitRun:
    epochs: int  # the fit's total; a resumed fit runs those its checkpoint has not done
    batch_size: int  # global: every rank trains on its share of each batch
    shuffle: bool
    seed: int  # epoch e's order comes from seed * 1_000_003 + e, so a resumed epoch shuffles alike
    checkpoint_dir: str | None  # absolute; None: no checkpoints
    checkpoint_every: int  # epochs between checkpoints; the last epoch run is always saved
    resume: bool  # go on from the newest complete checkpoint in checkpoint_dir
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigError(f"epochs and batch_size must be >= 1 (got {self.epochs}, {self.batch_size})")
        if self.checkpoint_every < 1 or self.keep_last < 1:
            raise ConfigError(f"checkpoint_every and keep_last must be >= 1 (got {self.checkpoint_every}, "
                              f"{self.keep_last})")
        if self.resume and self.checkpoint_dir is None:
            raise ConfigError("resume=True needs checkpoint_dir: the directory a fit wrote its checkpoints to")

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FitRun:
        check_keys(cls, doc)
        return cls(**doc)


@dataclass(frozen=True, kw_only=True)
class FitJob:
    out_dir: str  # rank 0's results (alloy.framework.worker's STATE, HISTORY, OPTIMIZER) land here
    payload: str  # torch.save file beside the job: the Model, the data, the callbacks, the start state
    run: FitRun
    weights: tuple[float, ...]  # relative throughput of every rank: their batch shares
    profiles: tuple[dict | None, ...]  # each rank's DeviceProfile dump (an emulated slice), or None
    main: dict  # the parent's __main__ and module search path (worker.main_module_data)
    # each rank's torch.manual_seed (dropout draws from it), drawn from the parent's generator: a
    # torch.manual_seed before fit makes a multi-device fit repeatable, as it does a single-process one
    torch_seeds: tuple[int, ...]
    timeout_s: float = 300.0  # how long a rank waits for the others at a collective
    # the rank that counts the loss (rank 0; a pipeline's last stage) appends one progress line per
    # step here (the launcher follows it)
    metrics_path: str | None = None
    # pipeline parallel (alloy.framework.pipeline): rank s runs the nn.Sequential's children
    # [stage_cuts[s], stage_cuts[s + 1]); None: data parallel
    stage_cuts: tuple[int, ...] | None = None
    micro_batches: int = 1  # a pipeline's micro-batches per global batch (a batch of fewer rows: one a row)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe (its tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FitJob:
        check_keys(cls, doc)
        cuts = doc.get("stage_cuts")
        return cls(**doc | {"run": FitRun.from_dict(doc["run"]), "weights": tuple(doc["weights"]),
                            "profiles": tuple(doc["profiles"]), "torch_seeds": tuple(doc["torch_seeds"]),
                            "stage_cuts": tuple(cuts) if cuts is not None else None})
