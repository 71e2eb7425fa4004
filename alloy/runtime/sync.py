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
from alloy.runtime.layout import RunLayout
from alloy.spec import ModelSpec

BUCKET_BYTES = 32 * 1024**2  # all-reduce in chunks of about this size


def stage_model(spec: ModelSpec, layout: RunLayout, rank: int, device="meta") -> Transformer:
    stage = layout.rank(rank).stage
    with torch.device(device):
        return Transformer(spec, (stage.first, stage.last), embed=stage.embed, head=stage.head)


def holder_sets(spec: ModelSpec, layout: RunLayout) -> dict[str, tuple[int, ...]]:
    """Logical parameter name -> the ranks that hold it, from the layout alone (no real model)."""
    holders: dict[str, list[int]] = defaultdict(list)
    for info in layout.ranks():
        model = stage_model(spec, layout, info.rank)
        for name, _ in model.named_parameters():
            holders[canonical_name(model, name)].append(info.rank)
    return {name: tuple(sorted(ranks)) for name, ranks in holders.items()}


class GradientSync:
    """Process groups for every holder set (made by every rank, in one order), and the
    bucketed all-reduce of this rank's gradients."""

    def __init__(self, spec: ModelSpec, layout: RunLayout, model: Transformer, rank: int, timeout=None):
        holders = holder_sets(spec, layout)
        self.groups = {}
        for ranks in sorted({r for r in holders.values() if len(r) > 1}):
            group = dist.new_group(list(ranks), timeout=timeout)  # collective: all ranks call it
            if rank in ranks:
                self.groups[ranks] = group
        self.params_by_group: dict[tuple[int, ...], list[torch.nn.Parameter]] = defaultdict(list)
        for name, param in model.named_parameters():
            ranks = holders[canonical_name(model, name)]
            if len(ranks) > 1:
                self.params_by_group[ranks].append(param)

    @torch.no_grad()
    def all_reduce(self) -> None:
        # One global order of groups on every rank; ranks that share two groups must not meet
        # them in opposite orders, or both wait forever.
        for ranks, params in sorted(self.params_by_group.items()):
            for bucket in _buckets(params):
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket]
                # Reduced on the host: gloo carries CPU tensors, so a GPU stage next to CPU ones works.
                flat = torch.cat([g.flatten() for g in grads]).cpu()
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.groups[ranks])
                offset = 0
                for p, g in zip(bucket, grads):
                    n = g.numel()
                    p.grad = flat[offset : offset + n].view_as(g).to(g.device)
                    offset += n


def _buckets(params: list[torch.nn.Parameter]):
    bucket, size = [], 0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if bucket and size + nbytes > BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
        bucket.append(p)
        size += nbytes
    if bucket:
        yield bucket
