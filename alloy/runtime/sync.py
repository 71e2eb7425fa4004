"""Gradient synchronisation for any mix of replicas and stages.

Every logical parameter (a layer's weight; the embedding and a tied head's copy of it) is held
by some set of ranks — one per replica, plus the last stage's head copy when tied. After the
backward pass each set sums its gradients (all-reduce SUM in its own process group). The loss
is already weighted by 1 / global tokens, so the sum *is* the full-batch mean gradient, however
uneven the batch shares are.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

from alloy.model import Transformer
from alloy.model.init import canonical_name
from alloy.model.lora import LoraConfig, apply_lora
from alloy.plan.timing import gradient_bucket_bytes, overlaps_backward
from alloy.runtime.layout import RunLayout
from alloy.spec import ModelSpec



def stage_model(spec: ModelSpec, layout: RunLayout, rank: int, device="meta", lora: dict | None = None) -> Transformer:
    stage = layout.rank(rank).stage
    with torch.device(device):
        model = Transformer(spec, stage.layers, embed=stage.has_embed, head=stage.has_head)
        return apply_lora(model, LoraConfig(**lora)) if lora else model


def holder_sets(spec: ModelSpec, layout: RunLayout, lora: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Trainable logical parameter name -> the ranks that hold it, from the layout alone (no real
    model). With LoRA only the adapters train: the frozen base is never reduced."""
    holders: dict[str, list[int]] = defaultdict(list)
    for info in layout.ranks():
        model = stage_model(spec, layout, info.rank, lora=lora)
        for name, param in model.named_parameters():
            if param.requires_grad:
                holders[canonical_name(model, name)].append(info.rank)
    return {name: tuple(sorted(ranks)) for name, ranks in holders.items()}


class GradientSync:
    """Process groups for every holder set (made by every rank, in one order), and the
    bucketed all-reduce of this rank's gradients.

    Buckets follow the parameters in reverse (the order the backward produces their gradients).
    With `overlap` (pure data parallel: every replica is one stage), `arm()` before the step's
    last backward starts each bucket's all-reduce as soon as its gradients are final, while the
    backward goes on; `finish()` starts whatever is left and waits. Buckets start strictly in
    order, so every rank issues the same calls in the same order.
    """

    def __init__(self, spec: ModelSpec, layout: RunLayout, model: Transformer, rank: int, timeout=None,
                 lora: dict | None = None, on_device: bool = False):
        # on_device: the job's collectives are on NCCL (alloy.runtime.layout.Transports), so each
        # bucket is reduced where its gradients are; else a host copy goes over gloo
        self.on_device = on_device
        holders = holder_sets(spec, layout, lora)
        self.groups = {}
        for ranks in sorted({r for r in holders.values() if len(r) > 1}):
            group = dist.new_group(list(ranks), timeout=timeout)  # collective: all ranks call it
            if rank in ranks:
                self.groups[ranks] = group
        params_by_group: dict[tuple[int, ...], list[torch.nn.Parameter]] = defaultdict(list)
        for name, param in reversed(list(model.named_parameters())):
            if not param.requires_grad:
                continue
            ranks = holders[canonical_name(model, name)]
            if len(ranks) > 1:
                params_by_group[ranks].append(param)
        self.overlap = overlaps_backward(layout.replicas)
        # One global order of groups on every rank; ranks that share two groups must not meet
        # them in opposite orders, or both wait forever.
        self.buckets: list[tuple[tuple[int, ...], list[torch.nn.Parameter]]] = []
        for ranks, params in sorted(params_by_group.items()):
            size = gradient_bucket_bytes(sum(p.numel() * p.element_size() for p in params), self.overlap)
            self.buckets += [(ranks, bucket) for bucket in _buckets(params, size)]
        self._bucket_of = {id(p): i for i, (_, bucket) in enumerate(self.buckets) for p in bucket}
        self._armed = False
        if self.overlap:
            for _, bucket in self.buckets:
                for p in bucket:
                    p.register_post_accumulate_grad_hook(self._ready)
        self._reset()

    def _reset(self) -> None:
        self._waiting = [len(bucket) for _, bucket in self.buckets]  # gradients not yet final
        self._launched: list[tuple] = []  # start_bucket's (work, flat, bucket, shapes)

    def arm(self) -> None:
        """The next backward is the step's last: start buckets as their gradients become final."""
        self._armed = self.overlap
        self._reset()

    def _ready(self, param: torch.nn.Parameter) -> None:
        if not self._armed:
            return
        self._waiting[self._bucket_of[id(param)]] -= 1
        while len(self._launched) < len(self.buckets) and self._waiting[len(self._launched)] == 0:
            self._launch()

    def _launch(self) -> None:
        ranks, bucket = self.buckets[len(self._launched)]
        self._launched.append(start_bucket(bucket, self.groups[ranks], self.on_device))

    def finish(self) -> None:
        """Start the buckets not yet started (all of them without overlap), wait, and put the sums
        back as the gradients."""
        self._armed = False
        while len(self._launched) < len(self.buckets):
            self._launch()
        for pending in self._launched:
            finish_bucket(pending)
        self._reset()


def allreduce_grads(params, group=None, bucket_bytes: float | None = None) -> None:
    """Sum the gradients of `params` over `group` (the default group when None) in buckets — the
    runtime's bucket rule after the backward unless `bucket_bytes` is given — every bucket started
    before any is waited for. A parameter without a gradient takes part with zeros (every rank
    must send the same buckets), so afterwards each has its summed gradient. Pass the parameters in
    backward order (reversed), as GradientSync does; a bucket holds one dtype."""
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = defaultdict(list)
    for p in params:
        if p.requires_grad:
            by_dtype[p.dtype].append(p)
    if bucket_bytes is None:
        total = sum(p.numel() * p.element_size() for same in by_dtype.values() for p in same)
        bucket_bytes = gradient_bucket_bytes(total, overlap=False)
    pending = [start_bucket(bucket, group) for same in by_dtype.values() for bucket in _buckets(same, bucket_bytes)]
    for started in pending:
        finish_bucket(started)


@torch.no_grad()
def start_bucket(bucket: list[torch.nn.Parameter], group=None, on_device: bool = False) -> tuple:
    """Flatten a bucket's gradients (zeros where a parameter has none) into one tensor and start
    its all-reduce (SUM); `finish_bucket` waits and puts the sums back. `on_device`: reduce it on
    the gradients' device (NCCL among GPUs); else on the host."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
    flat = torch.cat([g.flatten() for g in grads])
    if not on_device:
        flat = flat.cpu()  # gloo carries CPU tensors, so a GPU stage next to CPU ones works
    shapes = [(g.shape, g.device) for g in grads]
    del grads
    for p in bucket:  # the flat copy replaces them: a gradient is never held twice
        p.grad = None
    work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work, flat, bucket, shapes


@torch.no_grad()
def finish_bucket(pending: tuple) -> None:
    work, flat, bucket, shapes = pending
    work.wait()
    offset = 0
    for p, (shape, device) in zip(bucket, shapes):
        n = shape.numel()
        p.grad = flat[offset : offset + n].view(shape).to(device)
        offset += n


def _buckets(params: list[torch.nn.Parameter], size_bytes: float):
    bucket, size = [], 0
    for p in params:
        bucket.append(p)
        size += p.numel() * p.element_size()
        if size >= size_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
