"""One rank's share of a training step: its stage of its replica, on its device.

A one-stage replica runs forward and backward itself; a longer pipeline runs a
`torch.distributed.pipelining` schedule (1F1B or GPipe) over its replica's process group.
The model stays an unmodified Transformer slice: parallelism is applied around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from alloy.checkpoint import load as load_checkpoint
from alloy.model import Transformer
from alloy.model.init import canonical_name, init_params
from alloy.runtime.layout import RunLayout
from alloy.runtime.sync import GradientSync
from alloy.spec import ModelSpec

SCHEDULES = ("1f1b", "gpipe")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class StepRecord:
    step: int
    loss: float  # the full global batch's mean loss (same on every rank)
    step_s: float  # wall time of the whole step on this rank
    sync_s: float  # of which: gradient all-reduce
    extra: dict = field(default_factory=dict)


class HostBoundary(nn.Module):
    """Runs a stage on an accelerator while the pipeline's messages stay on the host (gloo)."""

    def __init__(self, module: nn.Module, device: torch.device):
        super().__init__()
        self.module, self.device = module, device

    def forward(self, x):
        return self.module(x.to(self.device)).to("cpu")


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


class StageRunner:
    def __init__(self, spec: ModelSpec, layout: RunLayout, rank: int, *, device: torch.device,
                 seed: int = 0, init_dir: str | None = None, optim: OptimConfig | None = None,
                 schedule: str = "1f1b", timeout=None):
        self.spec, self.layout, self.rank = spec, layout, rank
        self.info = layout.rank(rank)
        self.device = device
        stage = self.info.stage
        if init_dir:
            model = load_checkpoint(init_dir, layers=(stage.first, stage.last), embed=stage.embed, head=stage.head)
        else:
            model = init_params(Transformer(spec, (stage.first, stage.last), embed=stage.embed, head=stage.head), seed)
        self.model = model.to(device).train()
        optim = optim or OptimConfig()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay, eps=optim.eps)
        self.sync = GradientSync(spec, layout, self.model, rank, timeout=timeout)
        self.micro_batches = layout.micro_batches_for(self.info.replica)
        self._loss_scale = 1.0
        # Every rank creates every pipeline's group, in one order: new_group is collective.
        pipelines = sorted({i.pipeline_ranks for i in layout.ranks() if len(i.pipeline_ranks) > 1})
        groups = {ranks: dist.new_group(list(ranks), timeout=timeout) for ranks in pipelines}
        self.schedule = None
        if len(self.info.pipeline_ranks) > 1:
            self.schedule = self._pipeline(schedule, groups[self.info.pipeline_ranks])

    def _pipeline(self, kind: str, group):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        module = self.model if self.device.type == "cpu" else HostBoundary(self.model, self.device)
        stage = PipelineStage(module, self.info.stage_index, len(self.info.pipeline_ranks),
                              torch.device("cpu"), group=group)
        if kind == "1f1b" and self.micro_batches < len(self.info.pipeline_ranks):
            kind = "gpipe"  # 1F1B needs a micro-batch per stage in flight; GPipe is its fill-drain limit
        schedule_cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[kind]
        # scale_grads=False: the loss already carries the exact 1 / global-tokens weight.
        return schedule_cls(stage, self.micro_batches, loss_fn=self._mb_loss, scale_grads=False)

    def _mb_loss(self, logits, targets):
        return token_loss_sum(logits, targets) * self._loss_scale

    def step(self, step: int, batch: torch.Tensor) -> StepRecord:
        """batch: the global batch of token ids [global_batch, seq_len + 1]; this rank takes its share."""
        start_s = time.perf_counter()
        share = self.layout.batch_shares[self.info.replica]
        offset = self.layout.sample_offset(self.info.replica)
        rows = batch[offset : offset + share]
        inputs, targets = rows[:, :-1], rows[:, 1:]
        # Each token's loss weighs 1 / (all tokens of the global batch): summed over micro-batches
        # and replicas this is the full-batch mean, whatever the shares.
        self._loss_scale = 1.0 / (batch.shape[0] * inputs.shape[1])
        self.optimizer.zero_grad(set_to_none=True)
        stage = self.info.stage
        local_loss = torch.zeros((), dtype=torch.float64)
        if self.schedule is None:
            logits = self.model(inputs.to(self.device))
            loss = token_loss_sum(logits, targets.to(self.device)) * self._loss_scale
            loss.backward()
            local_loss += loss.detach().double().cpu()
        elif stage.embed:
            self.schedule.step(inputs)
        elif stage.head:
            losses: list[torch.Tensor] = []
            self.schedule.step(target=targets, losses=losses)
            local_loss += sum(l.detach().double() for l in losses)
        else:
            self.schedule.step()
        sync_start_s = time.perf_counter()
        self.sync.all_reduce()
        dist.all_reduce(local_loss)  # only last stages contribute: the global mean loss
        sync_s = time.perf_counter() - sync_start_s
        self.optimizer.step()
        return StepRecord(step, float(local_loss), time.perf_counter() - start_s, sync_s)

    def named_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under their logical names (a tied head copy is left out)."""
        return {name: p.detach().cpu() for name, p in self.model.named_parameters()
                if canonical_name(self.model, name) == name}
