"""The Plan: a plain, versioned JSON document. The planner writes it; the runtime reads only it.

Ranks are numbered replica-major: replica 0's stages first (in pipeline order), then replica 1's...
`Plan.model_json_schema()` is kept in alloy/plan/plan.schema.json (a test checks it is current).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alloy.devices import DeviceProfile
from alloy.errors import ConfigError
from alloy.jsonio import read_json_object, validation_message, write_text_atomic

PLAN_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("plan.schema.json")


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSummary(_Doc):
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_params: int
    max_seq_len: int
    spec: dict  # the full ModelSpec (ModelSpec.from_dict reads it back)


class ExpertPlacement(_Doc):
    """Inference: the experts (router and expert MLPs) of some of a stage's MoE layers, held and run
    by another device on a rank of its own; the stage sends each such layer's hidden states there
    and gets the MoE output back (what llama.cpp users do by hand with `--override-tensor
    exps=CPU`). Expert ranks come after every stage's rank, in stage order."""

    rank: int
    device: str
    layers: tuple[int, int]  # [start, stop) within the stage's own range
    predicted_memory_bytes: float
    memory_capacity_bytes: float
    predicted_busy_s: float


class Stage(_Doc):
    rank: int  # global rank, replica-major
    replica: int
    position: int  # place in its replica's pipeline, 0 = first
    device: str
    layers: tuple[int, int]  # transformer layers [start, stop)
    has_embed: bool
    has_head: bool
    predicted_memory_bytes: float
    memory_capacity_bytes: float
    predicted_busy_s: float  # compute time per step on this device
    predicted_utilisation: float  # busy / step time
    experts: ExpertPlacement | None = None  # infer only: these layers' experts run elsewhere

    @classmethod
    def unpredicted(cls, *, rank: int, replica: int, position: int, device: str, layers: tuple[int, int],
                    has_embed: bool, has_head: bool) -> Stage:
        """A stage placed without the planner (a layout written by hand, a job document from before
        the runtime held this class): the predictions and the capacity read 0.0, "not predicted"."""
        return cls(rank=rank, replica=replica, position=position, device=device, layers=layers,
                   has_embed=has_embed, has_head=has_head, predicted_memory_bytes=0.0, memory_capacity_bytes=0.0,
                   predicted_busy_s=0.0, predicted_utilisation=0.0)


class LinkUse(_Doc):
    """How the runtime moves data between two of the plan's devices, and what the plan priced."""

    a: str
    b: str
    # alloy.plan.transport's rule over the hop's whole pipeline: nccl among distinct CUDA GPUs of
    # one node (training), else gloo
    transport: Literal["gloo", "nccl"]
    through_host: bool  # an accelerator end copies to or from host memory first (gloo carries host tensors)
    message_bytes_per_element: int  # 4: training's fp32 activations and gradients; decoding's activation dtype
    bytes_per_s: float  # effective: gloo's host copies and the link in series; nccl: the link alone
    latency_s: float


class ReplicaPlan(_Doc):
    index: int
    batch_share: int  # samples (train) or requests (infer) of the global batch
    micro_batches: int  # this replica's micro-batch count (min of the plan's and its share)
    predicted_time_s: float  # its pipeline time per step, before the all-reduce
    stages: list[Stage]


class Prediction(_Doc):
    step_s: float  # train: one optimizer step; infer: prefill plus all new tokens for the batch
    tokens_per_s: float  # train: tokens trained per second; infer: tokens generated per second
    allreduce_s: float = 0.0  # every collective of a step: gradient buckets, tied copies, loss and norm
    optimizer_s: float = 0.0  # the slowest stage's optimizer update
    startup_s: float | None = None  # launching the workers, once per run (measured by calibration)
    prefill_s: float | None = None  # infer only
    decode_token_s: float | None = None  # infer only: one new token for the whole batch


class BaselinePrediction(_Doc):
    name: str
    description: str
    step_s: float | None  # None: it does not fit
    tokens_per_s: float | None
    speedup: float | None  # baseline step_s / plan step_s
    note: str = ""


class SearchInfo(_Doc):
    mode: Literal["exact", "heuristic"]
    layouts_scored: int
    seconds: float


class Trial(_Doc):
    """One candidate layout run for a few real steps before the plan was chosen."""

    name: str  # "alloy #1", "equal shares", "fastest alone (cpu0)", ...
    layout: str  # one line: each replica's devices, layers and share
    devices: list[str]
    predicted_step_s: float
    measured_step_s: float | None  # None: it failed (see error)
    error: str = ""


class Verification(_Doc):
    steps: int  # steps each candidate ran; the first is warm-up, the median of the rest counts
    trials: list[Trial]
    chosen: str  # the trial whose layout this plan is
    note: str  # why it won, and why any device is left out


class Plan(_Doc):
    version: Literal[1] = PLAN_VERSION
    task: Literal["train", "infer"]
    model: ModelSummary
    batch_size: int
    seq_len: int
    new_tokens: int
    dtype: str
    checkpointing: bool
    # train: LoRA adapters of this rank priced (the base frozen); None: full training. Optional, so
    # version-1 plans written before it still load as full training (as with `verification`).
    lora_rank: int | None = Field(default=None, ge=1)
    # QLoRA: the frozen block linears priced as GGUF blocks of this format; None: a float base
    quantize_base: Literal["q8_0", "q4_0", "q4_1", "q4_k"] | None = None
    micro_batches: int
    devices: list[DeviceProfile]  # the devices the plan uses, as profiled or declared
    replicas: list[ReplicaPlan]
    predicted: Prediction
    bottleneck: str
    baselines: list[BaselinePrediction]
    search: SearchInfo
    unused_devices: list[str] = Field(default_factory=list)
    # the pipeline hops and expert round trips, as priced; empty for plans written before (and one device)
    links: list[LinkUse] = Field(default_factory=list)
    # training with several workers: how gradients and scalars are reduced (the rule over every worker)
    collective_transport: Literal["gloo", "nccl"] | None = None
    verification: Verification | None = None  # measured candidates (alloy plan --verify, alloy train)

    @property
    def stages(self) -> list[Stage]:
        return [s for r in self.replicas for s in r.stages]

    @property
    def expert_ranks(self) -> list[ExpertPlacement]:
        return [s.experts for s in self.stages if s.experts is not None]

    @property
    def world_size(self) -> int:
        return len(self.stages) + len(self.expert_ranks)

    def stage_for_rank(self, rank: int) -> Stage:
        stages = self.stages
        if not 0 <= rank < len(stages):
            raise ConfigError(f"rank {rank} is not in this plan (world size {len(stages)})")
        return stages[rank]

    def replica_for_rank(self, rank: int) -> ReplicaPlan:
        return self.replicas[self.stage_for_rank(rank).replica]

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        data = read_json_object(path, "plan file")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"{path}: {validation_message(err)}") from None


def plan_schema() -> str:
    return json.dumps(Plan.model_json_schema(), indent=2) + "\n"


if __name__ == "__main__":  # python -m alloy.plan.plan: rewrite plan.schema.json after a change
    SCHEMA_PATH.write_text(plan_schema())
