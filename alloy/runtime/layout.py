"""Who does what: ranks, replicas, stages, batch shares — read from a Plan and checked.

Ranks are numbered replica-major: replica 0's stages first (in pipeline order), then replica
1's, and so on. That is the order `torchrun` hands out ranks, node by node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from typing import Any

from pydantic import ValidationError

from alloy.devices import DeviceProfile
from alloy.errors import ConfigError
from alloy.jsonio import validation_message
from alloy.plan import Stage
from alloy.plan.transport import Transport, transport
from alloy.spec import ModelSpec


class PlanMismatchError(ConfigError):
    """A plan that does not fit the model, the devices or the job it is given to."""


@dataclass(frozen=True)
class RankInfo:
    rank: int
    replica: int
    stage_index: int
    stage: Stage
    pipeline_ranks: tuple[int, ...]  # this replica's ranks, in stage order


@dataclass(frozen=True)
class RunLayout:
    replicas: tuple[tuple[Stage, ...], ...]  # the plan's stages, each replica in pipeline order
    batch_shares: tuple[int, ...]  # samples per step, per replica
    micro_batches: tuple[int, ...]  # per replica

    @property
    def world_size(self) -> int:
        return sum(len(r) for r in self.replicas)

    @property
    def global_batch(self) -> int:
        return sum(self.batch_shares)

    def ranks(self) -> list[RankInfo]:
        out, rank = [], 0
        for r, stages in enumerate(self.replicas):
            pipeline = tuple(range(rank, rank + len(stages)))
            for s, stage in enumerate(stages):
                out.append(RankInfo(rank, r, s, stage, pipeline))
                rank += 1
        return out

    def rank(self, rank: int) -> RankInfo:
        if not 0 <= rank < self.world_size:
            raise PlanMismatchError(f"rank {rank} is outside the plan's world of {self.world_size}")
        return self.ranks()[rank]

    def sample_offset(self, replica: int) -> int:
        """Index of this replica's first sample in the global batch."""
        return sum(self.batch_shares[:replica])

    def micro_batches_for(self, replica: int) -> int:
        """The plan's micro-batch count, lowered to a divisor of this replica's share: pipeline
        schedules need equal micro-batches, and the loss weighting keeps the result exact. The
        planner prices exactly this count (one rule for both)."""
        from alloy.plan.timing import train_micro_batches

        return train_micro_batches(self.batch_shares[replica], self.micro_batches[replica],
                                   len(self.replicas[replica]))

    def validate(self, spec: ModelSpec) -> None:
        """Every replica must tile the model's layers exactly once, in order."""
        if not len(self.batch_shares) == len(self.micro_batches) == len(self.replicas):
            raise PlanMismatchError(f"plan has {len(self.replicas)} replicas but {len(self.batch_shares)} "
                                    f"batch shares and {len(self.micro_batches)} micro-batch counts")
        rank = 0
        for r, stages in enumerate(self.replicas):
            if not stages:
                raise PlanMismatchError(f"replica {r} has no stages")
            if self.batch_shares[r] < 1:
                raise PlanMismatchError(f"replica {r} has batch share {self.batch_shares[r]}; each needs >= 1")
            expected = 0
            for s, stage in enumerate(stages):
                first, last = stage.layers
                where = f"replica {r} stage {s} ({stage.device}) layers [{first}, {last})"
                if (stage.rank, stage.replica, stage.position) != (rank, r, s):
                    raise PlanMismatchError(f"{where}: numbered rank {stage.rank}, replica {stage.replica}, "
                                            f"position {stage.position}; ranks go replica-major")
                if first != expected:
                    kind = "gap" if first > expected else "overlap"
                    raise PlanMismatchError(f"{where}: {kind} — expected it to start at layer {expected}")
                if last < first:
                    raise PlanMismatchError(f"{where}: empty or reversed range")
                if stage.has_embed != (s == 0) or stage.has_head != (s == len(stages) - 1):
                    raise PlanMismatchError(f"{where}: embeddings belong on the first stage, the head on the last")
                expected = last
                rank += 1
            if expected != spec.num_layers:
                raise PlanMismatchError(
                    f"replica {r} covers layers [0, {expected}) but the model has {spec.num_layers} layers")

    def placement(self) -> RunLayout:
        """This layout without the plan's predictions: what a checkpoint depends on (a plan made
        again after calibration predicts other times for the same layers, devices and shares)."""
        return RunLayout(_numbered([[_placed(s) for s in stages] for stages in self.replicas]),
                         self.batch_shares, self.micro_batches)

    @classmethod
    def of(cls, replicas: Sequence[Sequence[tuple[str, int, int]]], batch_shares: Sequence[int],
           micro_batches: Sequence[int]) -> RunLayout:
        """A layout without a plan (tests, hand-made jobs): each replica's stages as (device, first
        layer, stop layer) in pipeline order, embeddings on its first stage and the head on its last."""
        placed = [[dict(device=device, layers=(first, last), has_embed=s == 0, has_head=s == len(stages) - 1)
                   for s, (device, first, last) in enumerate(stages)] for stages in replicas]
        return cls(_numbered(placed), tuple(batch_shares), tuple(micro_batches))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunLayout:
        """Back from to_dict. A stage written before the runtime held the plan's Stage (keys device,
        first, last, embed, head: older job documents and checkpoint manifests) loads unpredicted."""
        replicas = data["replicas"]
        try:
            if any("first" in s for stages in replicas for s in stages):
                placed = [[dict(device=s["device"], layers=(s["first"], s["last"]), has_embed=s["embed"],
                                has_head=s["head"]) for s in stages] for stages in replicas]
                replicas = _numbered(placed)
            else:
                replicas = tuple(tuple(Stage.model_validate(s) for s in stages) for stages in replicas)
        except ValidationError as err:
            raise PlanMismatchError(f"layout: {validation_message(err)}") from None
        return cls(replicas, tuple(data["batch_shares"]), tuple(data["micro_batches"]))

    @classmethod
    def from_plan(cls, plan) -> RunLayout:
        """The execution view of an `alloy.plan.Plan` document: its stages, as the plan wrote them."""
        replicas = sorted(plan.replicas, key=lambda r: r.index)
        return cls(
            replicas=tuple(tuple(sorted(r.stages, key=lambda s: s.position)) for r in replicas),
            batch_shares=tuple(r.batch_share for r in replicas),
            micro_batches=tuple(max(1, r.micro_batches) for r in replicas),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "replicas": [[s.model_dump(mode="json") for s in stages] for stages in self.replicas],
            "batch_shares": list(self.batch_shares),
            "micro_batches": list(self.micro_batches),
        }


@dataclass(frozen=True)
class Transports:
    """How a job's ranks exchange tensors: alloy.plan.transport's rule, the one the plan priced
    (its `links[].transport` and `collective_transport`)."""

    pipelines: dict[tuple[int, ...], Transport]  # each pipeline's ranks (two or more) -> its messages' transport
    collectives: Transport  # every rank together: gradient buckets, tied copies, the step's scalars

    @property
    def nccl(self) -> bool:
        """Whether any group of the job reduces or sends over NCCL (the process group then needs it)."""
        return "nccl" in (self.collectives, *self.pipelines.values())

    def to_dict(self, pipeline_ranks: tuple[int, ...]) -> dict[str, Transport | None]:
        """What a rank of this pipeline uses, for its record of the run (pipeline None: a one-stage
        replica sends no messages)."""
        return {"pipeline": self.pipelines.get(pipeline_ranks), "collectives": self.collectives}


GLOO_ONLY = Transports({}, "gloo")


def _placed(stage: Stage) -> dict[str, Any]:
    return dict(device=stage.device, layers=stage.layers, has_embed=stage.has_embed, has_head=stage.has_head)


def _numbered(replicas: Sequence[Sequence[dict[str, Any]]]) -> tuple[tuple[Stage, ...], ...]:
    """Unpredicted stages from their placements, ranks numbered replica-major."""
    ranks = count()
    return tuple(tuple(Stage.unpredicted(rank=next(ranks), replica=r, position=p, **placed)
                       for p, placed in enumerate(stages)) for r, stages in enumerate(replicas))


def job_transports(layout: RunLayout, profiles: dict[str, DeviceProfile], nccl_usable: bool) -> Transports:
    """Each pipeline's transport (a pipeline stage sends and receives on one device, so the whole
    pipeline shares one) and the collectives' (every rank's). A rank whose device has no profile
    is a plain CPU rank: gloo. Every rank computes the same answer from the job."""
    devices = {info.rank: profiles.get(info.stage.device) for info in layout.ranks()}

    def rule(ranks) -> Transport:
        members = [devices[r] for r in ranks]
        return "gloo" if None in members else transport(members, nccl_usable)

    pipelines = {info.pipeline_ranks for info in layout.ranks() if len(info.pipeline_ranks) > 1}
    return Transports({ranks: rule(ranks) for ranks in sorted(pipelines)}, rule(sorted(devices)))
