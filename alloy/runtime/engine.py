"""One rank's share of a training step: its stage of its replica, on its device.

A one-stage replica runs forward and backward itself; a longer pipeline runs a
`torch.distributed.pipelining` schedule (1F1B or GPipe) over its replica's process group.
The model stays an unmodified Transformer slice: precision, activation checkpointing and
parallelism are applied around it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from alloy.model import Transformer
from alloy.model.init import canonical_name
from alloy.runtime.build import build_stage_model
from alloy.runtime.data import IGNORE_INDEX, loss_target_count, split_batch
from alloy.runtime.layout import GLOO_ONLY, RunLayout, Transports
from alloy.runtime.sync import GradientSync
from alloy.spec import ModelSpec

PIPELINE_SCHEDULES = ("1f1b", "gpipe")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 1.0  # 1.0: constant learning rate
    grad_clip: float = 0.0  # max global gradient norm; 0 = off

    def lr_at(self, step: int, total_steps: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepRecord:
    step: int
    loss: float  # the full global batch's mean loss (same on every rank)
    lr: float
    grad_norm: float  # before clipping, over the whole model
    step_s: float  # wall time of the whole step on this rank
    sync_s: float  # of which: gradient all-reduce and loss/norm reductions
    optimizer_s: float = 0.0  # of which: the update (gradient norm, clipping, optimizer step)
    started_s: float = 0.0  # perf_counter at the step's start: start to start is the real step period
    previous_step_s: list[float] | None = None  # every rank's step_s of the step before (0 at the first)


class StageModule(nn.Module):
    """The stage as the pipeline sees it: autocast, and an accelerator's output put where the
    pipeline's messages travel (`message_device`): the host under gloo, its own GPU under NCCL."""

    def __init__(self, model: Transformer, device: torch.device, precision: str,
                 message_device: torch.device | None = None):
        super().__init__()
        self.model, self.device, self.precision = model, device, precision
        self.message_device = message_device or torch.device("cpu")

    def forward(self, x):
        with autocast(self.device, self.precision):
            out = self.model(x.to(self.device))
        if self.device.type == "cpu":
            return out
        # sent in at least fp32, as the planner prices training's messages (alloy.plan.cost
        # MESSAGE_BYTES): autocast's bf16 is upcast; fp64 (equality tests) stays fp64
        return out.to(self.message_device, torch.promote_types(out.dtype, torch.float32))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_activation_checkpointing(model: Transformer) -> Transformer:
    """Recompute each block in the backward pass instead of keeping its activations."""
    for block in model.layers.values():
        forward = block.forward
        block.forward = lambda *args, _f=forward, **kw: checkpoint(_f, *args, use_reentrant=False, **kw)
    return model


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross entropy; IGNORE_INDEX targets (no-loss tokens) add nothing."""
    # bf16/fp16 logits are upcast to fp32; fp32 and fp64 ones are kept as they are
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=IGNORE_INDEX)


class StageRunner:
    def __init__(self, spec: ModelSpec, layout: RunLayout, rank: int, *, device: torch.device,
                 seed: int = 0, init_dir: str | None = None, optim: OptimConfig | None = None,
                 pipeline_schedule: str = "1f1b", precision: str = "fp32", activation_checkpointing: bool = False,
                 timeout=None, param_dtype: str = "fp32", lora: dict | None = None,
                 transports: Transports = GLOO_ONLY):
        self.spec, self.layout, self.rank = spec, layout, rank
        self.info = layout.rank(rank)
        self.device, self.precision = device, precision
        # Where this rank's tensors travel: its GPU for a group on NCCL, the host for gloo
        self.transport = transports.to_dict(self.info.pipeline_ranks)
        self.message_device = device if self.transport["pipeline"] == "nccl" else torch.device("cpu")
        self.collective_device = device if self.transport["collectives"] == "nccl" else torch.device("cpu")
        stage = self.info.stage
        if lora and lora.get("quantize_base") and device.type != "cpu":
            # QLoRA's block formats run on CPU workers; a GPU stage of the run keeps its frozen base
            # in float (plain LoRA there), as the plan priced it (alloy.plan.timing.quantized_base_here)
            lora = {**lora, "quantize_base": None}
        # LoRA: the base frozen, adapters (in the parameters' dtype) the only trainable tensors
        self.model = build_stage_model(spec, stage.layers, embed=stage.has_embed, head=stage.has_head,
                                       init_dir=init_dir, seed=seed, param_dtype=param_dtype,
                                       lora=lora).to(device)
        if activation_checkpointing:
            apply_activation_checkpointing(self.model)
        self.module = StageModule(self.model, device, precision, self.message_device)
        self.optim = optim or OptimConfig()
        # fused: one kernel per tensor for the whole update (3.4x the for-loop's speed on a Xeon
        # core for a 10M-parameter model); the same arithmetic, as the tests against the plain one show.
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # frozen: no optimizer state
        self.optimizer = torch.optim.AdamW(trainable, lr=self.optim.lr, betas=self.optim.betas,
                                           weight_decay=self.optim.weight_decay, eps=self.optim.eps,
                                           fused=device.type in ("cpu", "cuda") or None)
        self.sync = GradientSync(spec, layout, self.model, rank, timeout=timeout, lora=lora,
                                 on_device=self.collective_device.type != "cpu")
        self.micro_batches = layout.micro_batches_for(self.info.replica)
        self._loss_scale = 1.0
        self._last_step_s = 0.0
        # Every rank creates every pipeline's group, in one order: new_group is collective.
        pipelines = sorted({i.pipeline_ranks for i in layout.ranks() if len(i.pipeline_ranks) > 1})
        groups = {ranks: dist.new_group(list(ranks), timeout=timeout) for ranks in pipelines}
        self.schedule, self.pipeline_group = None, groups.get(self.info.pipeline_ranks)
        if len(self.info.pipeline_ranks) > 1:
            self.schedule = self._pipeline(pipeline_schedule, self.pipeline_group)

    def _pipeline(self, kind: str, group):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        # every stage of a pipeline sends and receives on the same kind of device: NCCL's GPUs or gloo's host
        stage = PipelineStage(self.module, self.info.stage_index, len(self.info.pipeline_ranks),
                              self.message_device, group=group)
        if kind == "1f1b" and self.micro_batches < len(self.info.pipeline_ranks):
            kind = "gpipe"  # 1F1B needs a micro-batch per stage in flight; GPipe is its fill-drain limit
        schedule_cls = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[kind]
        # scale_grads=False: the loss already carries the exact 1 / global-tokens weight.
        return schedule_cls(stage, self.micro_batches, loss_fn=self._mb_loss, scale_grads=False)

    def _mb_loss(self, logits, targets):
        return token_loss_sum(logits, targets) * self._loss_scale

    def _my_rows(self, batch: torch.Tensor) -> torch.Tensor:
        share = self.layout.batch_shares[self.info.replica]
        offset = self.layout.sample_offset(self.info.replica)
        return batch[offset : offset + share]

    def step(self, step: int, batches: list[torch.Tensor], lr: float) -> StepRecord:
        """One optimizer step over `batches` (gradient accumulation: each is a global batch of
        token ids [global_batch, seq_len + 1]); this rank takes its replica's rows of each."""
        start_s = time.perf_counter()
        # Each target's loss weighs 1 / (loss-carrying targets of all accumulated global batches):
        # summed over micro-batches, accumulation and replicas this is the full-batch mean, whatever
        # the shares. Every rank holds every global batch, so every rank counts the same. A step
        # with no loss target (all prompt or padding) sums to 0 and is scaled by 1: no 0/0.
        targets = sum(loss_target_count(batch) for batch in batches)
        self._loss_scale = 1.0 / targets if targets else 1.0
        self.optimizer.zero_grad(set_to_none=True)
        local_loss = torch.zeros((), dtype=torch.float64)
        for i, batch in enumerate(batches):
            if i == len(batches) - 1:
                self.sync.arm()  # data parallel: gradient buckets go out while this backward runs
            local_loss += self._forward_backward(self._my_rows(batch))
        sync_start_s = time.perf_counter()
        self.sync.finish()
        sync_s = time.perf_counter() - sync_start_s
        update_start_s = time.perf_counter()
        squares = self._norm_squares()
        update_s = time.perf_counter() - update_start_s
        # One collective for every scalar, since each call costs a collective's latency: the global
        # mean loss (only last stages contribute), the squared gradient norm (replica 0's copies)
        # and every rank's previous step time (for the metrics; no extra collective, no barrier).
        scalars = torch.zeros(2 + dist.get_world_size(), dtype=torch.float64)
        scalars[0], scalars[1], scalars[2 + dist.get_rank()] = local_loss, squares, self._last_step_s
        sync_start_s = time.perf_counter()
        scalars = self._all_reduce(scalars)
        sync_s += time.perf_counter() - sync_start_s
        update_start_s = time.perf_counter()
        grad_norm = self._clip(float(scalars[1].sqrt()))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        end_s = time.perf_counter()
        update_s += end_s - update_start_s
        self._last_step_s = end_s - start_s
        return StepRecord(step, float(scalars[0]), lr, grad_norm, end_s - start_s, sync_s, update_s, start_s,
                          scalars[2:].tolist())

    def _all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small host tensor over every rank, on the collectives' device; back on the host."""
        values = values.to(self.collective_device)
        dist.all_reduce(values)
        return values.cpu()

    def _forward_backward(self, rows: torch.Tensor) -> torch.Tensor:
        inputs, targets = split_batch(rows)
        stage = self.info.stage
        if self.schedule is None:
            logits = self.module(inputs)
            loss = token_loss_sum(logits, targets.to(logits.device)) * self._loss_scale
            loss.backward()
            return loss.detach().double().cpu()
        # the schedule splits these into micro-batches on the device its messages travel on
        inputs, targets = inputs.to(self.message_device), targets.to(self.message_device)
        if stage.has_embed:
            self.schedule.step(inputs)
        elif stage.has_head:
            losses: list[torch.Tensor] = []
            self.schedule.step(target=targets, losses=losses)
            return sum(l.detach().double().cpu() for l in losses)
        else:
            self.schedule.step()
        return torch.zeros((), dtype=torch.float64)

    def _norm_squares(self) -> torch.Tensor:
        """This rank's part of the squared global gradient norm over the logical model (each
        parameter counted once: replica 0's copies, after the all-reduce made every replica equal)."""
        squares = torch.zeros((), dtype=torch.float64)
        if self.info.replica == 0:
            for name, p in self.model.named_parameters():
                if p.grad is not None and canonical_name(self.model, name) == name:
                    # each tensor's norm in its own dtype, as clip_grad_norm_ takes it (a float64
                    # copy of every gradient cost ~14x more), summed across tensors in float64
                    squares += torch.linalg.vector_norm(p.grad.detach()).double().cpu() ** 2
        return squares

    def _clip(self, norm: float) -> float:
        """Clip the gradient to optim.grad_clip; returns the norm before clipping."""
        if self.optim.grad_clip and norm > self.optim.grad_clip:
            scale = self.optim.grad_clip / (norm + 1e-6)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        return norm

    @torch.no_grad()
    def evaluate(self, batch: torch.Tensor) -> float:
        """Mean next-token loss of a global batch, forward only, through each replica's pipeline."""
        rows = self._my_rows(batch)
        inputs, targets = split_batch(rows)
        stage, pipeline = self.info.stage, self.info.pipeline_ranks
        position = self.info.stage_index
        total = torch.zeros((), dtype=torch.float64)
        x = inputs
        dtype = next(self.model.parameters()).dtype  # hidden states travel in the parameters' dtype
        if not stage.has_embed:  # hidden states from the previous stage
            x = torch.empty(inputs.shape + (self.spec.hidden_size,), dtype=dtype, device=self.message_device)
            dist.recv(x, src=pipeline[position - 1], group=self.pipeline_group)
        out = self.module(x)
        if stage.has_head:
            total += token_loss_sum(out, targets.to(out.device)).double().cpu()
        else:
            dist.send(out.to(self.message_device, dtype).contiguous(), dst=pipeline[position + 1],
                      group=self.pipeline_group)
        total = self._all_reduce(total)
        return float(total) / max(1, loss_target_count(batch))  # a batch of no loss targets: 0

    def named_state(self) -> dict[str, torch.Tensor]:
        """This rank's parameters under their logical names (a tied head copy is left out)."""
        return {name: p.detach().cpu() for name, p in self.model.named_parameters()
                if canonical_name(self.model, name) == name}
