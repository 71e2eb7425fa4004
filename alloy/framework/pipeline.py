"""Pipeline-parallel `alloy.Model.fit(..., parallelism="pipeline")` for an `nn.Sequential`.

Its children are cut into contiguous stages, one per device in the inventory's order, by measured
cost: each child's forward + backward is timed on one micro-batch in the parent, divided by each
device's relative speed, and split by the planner's partition (alloy.plan.search.bottleneck_cuts).
Rank s runs stage s.

Each optimizer step is GPipe: every micro-batch of the global batch goes forward through the
stages, then every one backward, with plain send/recv on the default (gloo) group, as the
Transformer runtime's evaluation sends hidden states. (torch.distributed.pipelining's stages fix
every micro-batch's shape the first time they run; a fit's micro-batches differ by a row, and its
last batch is smaller.) Each micro-batch's per-sample losses are summed and divided by the global
batch's rows, so the accumulated gradient is the full batch's mean's, as in the data-parallel fit.

Every rank holds the whole module and an optimizer over all of it, but runs and steps only its own
children (the others get no gradient, and torch's optimizers skip a parameter without one). After
every epoch rank 0 gathers each stage's weights and optimizer state, so callbacks, checkpoints and
the parent's Model see the whole model; losses and metrics are counted on the last stage and
broadcast. Assumed, as nn.Sequential does: a child takes and returns one tensor, batch first, whose
other dimensions do not depend on the batch's rows.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from alloy.errors import ConfigError
from alloy.framework.model import _batches, _logs, _Rank, _tally
from alloy.framework.registry import make_loss, make_metric
from alloy.plan.search import bottleneck_cuts

PROFILE_REPS = 3  # a child's cost: the least of this many timed forward + backward passes


def plan_stages(module: nn.Module, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor, loss,
                weights: tuple[float, ...], batch_size: int, micro_batches: int | None) -> tuple[tuple[int, ...], int]:
    """(cuts, micro-batches) of a pipeline-parallel fit: stage s holds children[cuts[s]:cuts[s + 1]]."""
    if not isinstance(module, nn.Sequential):
        raise ConfigError(f"parallelism='pipeline' cuts an nn.Sequential's children into stages, and this module is "
                          f"a {type(module).__name__}; wrap its layers in nn.Sequential or use parallelism='data'")
    if len(weights) < 2:
        raise ConfigError("parallelism='pipeline' needs several devices, one stage each, and devices gives one; "
                          "pass a cluster of several or use parallelism='data'")
    if len(module) < len(weights):
        raise ConfigError(f"parallelism='pipeline' over {len(weights)} devices needs at least {len(weights)} children "
                          f"in the nn.Sequential (one stage each), and it has {len(module)}")
    if len(inputs) != 1:
        raise ConfigError(f"parallelism='pipeline' feeds one input tensor to the nn.Sequential, got {len(inputs)}")
    micro_batches = len(weights) if micro_batches is None else micro_batches
    if not isinstance(micro_batches, int) or micro_batches < 1:
        raise ConfigError(f"microbatches must be an integer >= 1 (got {micro_batches!r})")
    rows = min(len(targets), math.ceil(batch_size / micro_batches))  # one micro-batch: what a stage's slot runs
    costs_s = child_costs_s(module, inputs[0][:rows], targets[:rows], make_loss(loss)[0])
    fastest = max(weights)
    cuts = bottleneck_cuts(costs_s, [w / fastest for w in weights])
    seen: set[int] = set()
    for first, stop in itertools.pairwise(cuts):
        mine = {id(p) for p in module[first:stop].parameters()}
        if mine & seen:  # each stage steps its own copy: a tied weight would drift apart
            raise ConfigError("a parameter is shared by two pipeline stages (tied weights); use parallelism='data'")
        seen |= mine
    boundaries(module, cuts, inputs[0][:1])  # refuses a cut no gradient crosses, here rather than in a rank
    return cuts, micro_batches


def child_costs_s(module: nn.Sequential, x: torch.Tensor, y: torch.Tensor, loss_fn,
                  reps: int = PROFILE_REPS) -> list[float]:
    """Each child's forward + backward time on the sample batch (x, y), in seconds, the least of
    `reps`; on a copy of the module in a forked RNG, so the fit's BatchNorm statistics, gradients
    and dropout draws stay as they were."""
    module = copy.deepcopy(module).train()
    best_s = [math.inf] * len(module)
    with torch.random.fork_rng():
        for _ in range(reps):
            passes = []  # (input, output, forward seconds) of each child
            out = x
            for child in module:
                inp = out.detach().requires_grad_(out.is_floating_point())
                start_s = time.perf_counter()
                out = child(inp)
                passes.append((inp, out, time.perf_counter() - start_s))
            grad = None
            for k in reversed(range(len(module))):
                inp, out, forward_s = passes[k]
                start_s = time.perf_counter()
                if k == len(module) - 1:
                    loss_fn(out, y).sum().backward()
                elif grad is not None and out.requires_grad:
                    out.backward(grad)
                best_s[k] = min(best_s[k], forward_s + time.perf_counter() - start_s)
                grad = inp.grad
    return best_s


@torch.no_grad()
def boundaries(module: nn.Sequential, cuts: tuple[int, ...],
               row: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape past the batch dimension, dtype) of the tensor stage s sends stage s + 1, from one
    row run through the module in eval mode (no dropout draw, no BatchNorm update)."""
    was_training = module.training
    module.eval()
    try:
        found, x = [], row
        for s, (first, stop) in enumerate(itertools.pairwise(cuts[:-1])):
            x = module[first:stop](x)
            if not x.is_floating_point():
                raise ConfigError(f"the pipeline's stage {s} ends after child {stop - 1}, whose output is {x.dtype}: "
                                  "no gradient can cross it; use parallelism='data'")
            found.append((tuple(x.shape[1:]), x.dtype))
    finally:
        module.train(was_training)
    return found


@dataclass
class Pipeline:
    """One rank's stage of a pipeline-parallel fit (rank s runs stage s)."""

    module: nn.Sequential  # the whole module: every rank holds it, and runs its own children
    cuts: tuple[int, ...]  # stage s holds children[cuts[s]:cuts[s + 1]]
    stage: int
    micro_batches: int  # per global batch; a batch of fewer rows gets one a row
    sends: list[tuple[tuple[int, ...], torch.dtype]]  # boundaries(): what stage s sends stage s + 1
    segment: nn.Sequential = field(init=False)  # this stage's children, under the whole module's names

    def __post_init__(self):
        self.segment = self.module[self.cuts[self.stage] : self.cuts[self.stage + 1]]
        self.first, self.last = self.stage == 0, self.stage == len(self.cuts) - 2

    @classmethod
    def for_rank(cls, module: nn.Sequential, cuts: tuple[int, ...], rank: int, micro_batches: int,
                 row: torch.Tensor) -> Pipeline:
        return cls(module, cuts, rank, micro_batches, boundaries(module, cuts, row))

    def _receive(self, rows: int, boundary: int, src: int) -> torch.Tensor:
        shape, dtype = self.sends[boundary]
        tensor = torch.empty((rows, *shape), dtype=dtype)
        dist.recv(tensor, src=src)
        return tensor

    def _forward(self, x: torch.Tensor, rows: torch.Tensor):
        """(input, output) of this stage for `rows` of the batch; the output goes on to the next stage."""
        inp = x[rows] if self.first else self._receive(len(rows), self.stage - 1, self.stage - 1)
        if not self.first and torch.is_grad_enabled():
            inp.requires_grad_()
        out = self.segment(inp)
        if not self.last:
            dist.send(out.detach().contiguous(), dst=self.stage + 1)
        return inp, out

    def train_step(self, index: torch.Tensor, x, y, loss_fn, metrics, totals: torch.Tensor) -> None:
        """Forward and backward the global batch `index` (its rows of x, y) in GPipe order; the
        gradients accumulate in this stage's parameters. The last stage counts loss and metrics."""
        passes = []  # (input, output; the last stage: its scaled loss) of each micro-batch
        for rows in index.tensor_split(min(self.micro_batches, len(index))):
            inp, out = self._forward(x, rows)
            if self.last:  # exact share of the global batch's mean
                out = _tally(out, y[rows], loss_fn, metrics, totals).sum() / len(index)
            passes.append((inp, out))
        for inp, out in passes:
            out.backward(None if self.last else self._receive(len(inp), self.stage, self.stage + 1))
            if not self.first:
                dist.send(inp.grad, dst=self.stage - 1)

    @torch.no_grad()
    def evaluate(self, x, y, compiled: dict, batch_size: int) -> dict[str, float]:
        """Forward only through the stages, whole batches of `batch_size`; every rank gets the logs."""
        loss_fn, _ = make_loss(compiled["loss"])
        metrics = [make_metric(m) for m in compiled["metrics"]]
        totals = torch.zeros(2, dtype=torch.float64)
        was_training = self.module.training
        self.module.eval()
        for index in _batches(len(y), batch_size, torch.arange(len(y))):
            _, out = self._forward(x, index)
            if self.last:
                _tally(out, y[index], loss_fn, metrics, totals)
        self.module.train(was_training)
        return self.logs(totals, metrics)

    def logs(self, totals: torch.Tensor, metrics) -> dict[str, float]:
        """The last stage's logs (the others saw no outputs), on every rank."""
        logs = [_logs(totals, metrics, _Rank()) if self.last else None]
        dist.broadcast_object_list(logs, src=len(self.cuts) - 2)
        return logs[0]

    def gather(self, model) -> None:
        """Rank 0's module and optimizer get every stage's weights and optimizer state."""
        params = [p for group in model.optimizer.param_groups for p in group["params"]]
        mine = {id(p) for p in self.segment.parameters()}
        state = model.optimizer.state_dict()
        share = ({name: t.detach() for name, t in self.segment.state_dict().items()},
                 {i: s for i, s in state["state"].items() if id(params[i]) in mine})
        shares = [None] * (len(self.cuts) - 1) if self.first else None
        dist.gather_object(share, shares, dst=0)
        if not self.first:
            return
        whole = model.module.state_dict()
        with torch.no_grad():
            for weights, optimizer_state in shares:
                for name, tensor in weights.items():
                    whole[name].copy_(tensor)
                state["state"].update(optimizer_state)
        model.optimizer.load_state_dict(state)
