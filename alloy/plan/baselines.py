"""The layouts users get from today's tools, scored with the same timing model as the plan.

- equal layer split: every device (inventory order) one pipeline stage, the same number of layers each (GPipe,
  torch.distributed.pipelining's default split);
- memory-proportional split: layers in proportion to device memory (llama.cpp, exo);
- greedy fill: fill each accelerator in order, then the CPU, until its memory is full, no
  micro-batching (accelerate device_map="auto");
- equal batch shares: every device a full replica with an equal share (DDP).
"""

from __future__ import annotations

from dataclasses import dataclass

from alloy.plan.search import largest_remainder
from alloy.plan.timing import Layout, Problem, Replica, stage_compute_s, stage_memory_bytes, step_timing


@dataclass(frozen=True)
class Baseline:
    name: str
    description: str
    layout: Layout | None  # None when the method cannot even produce a layout
    note: str = ""


def baselines(p: Problem, micro_batches: int) -> list[Baseline]:
    return [equal_split(p, micro_batches), memory_proportional(p, micro_batches), greedy_fill(p),
            equal_shares(p, micro_batches)]


def _pipeline_devices(p: Problem) -> tuple[int, ...]:
    return tuple(range(min(len(p.devices), p.num_layers)))


def _cuts(counts: list[int]) -> tuple[int, ...]:
    cuts = [0]
    for c in counts:
        cuts.append(cuts[-1] + c)
    return tuple(cuts)


def equal_split(p: Problem, micro_batches: int) -> Baseline:
    devices = _pipeline_devices(p)
    counts = largest_remainder(p.num_layers, [1.0] * len(devices))
    layout = Layout((Replica(devices, _cuts(counts), p.work.batch_size),), micro_batches)
    return Baseline("equal layers", "one pipeline, the same number of layers per device", layout)


def memory_proportional(p: Problem, micro_batches: int) -> Baseline:
    devices = _pipeline_devices(p)
    counts = largest_remainder(p.num_layers, [float(p.memory_bytes[d]) for d in devices])
    layout = Layout((Replica(devices, _cuts(counts), p.work.batch_size),), micro_batches)
    return Baseline("memory-proportional", "one pipeline, layers in proportion to memory (llama.cpp, exo)",
                    layout)


def greedy_fill(p: Problem) -> Baseline:
    description = "fill devices in order until each is full, no micro-batching (accelerate 'auto')"
    share, L = p.work.batch_size, p.num_layers
    devices, cuts = [], [0]
    # accelerate fills accelerators in index order and spills to the CPU last.
    for d in sorted(range(len(p.devices)), key=lambda d: p.devices[d].kind == "cpu"):
        start, stop = cuts[-1], cuts[-1]
        while stop < L and stage_memory_bytes(p, start, stop + 1, 1, share, share, d) <= p.memory_bytes[d]:
            stop += 1
        if stop > start:
            devices.append(d)
            cuts.append(stop)
        if stop == L:
            break
    if cuts[-1] < L:
        return Baseline("greedy fill", description, None, f"fills up after {cuts[-1]} of {L} layers")
    layout = Layout((Replica(tuple(devices), tuple(cuts), share),), 1)
    return Baseline("greedy fill", description, layout)


def equal_shares(p: Problem, micro_batches: int) -> Baseline:
    description = "every device a whole replica, equal batch shares (DDP)"
    if p.work.task == "infer":
        description = "every device a whole replica, equal request shares"
    replicas_n = min(len(p.devices), p.work.batch_size)
    shares = largest_remainder(p.work.batch_size, [1.0] * replicas_n)
    replicas = tuple(Replica((d,), (0, p.num_layers), n) for d, n in zip(range(replicas_n), shares))
    return Baseline("equal shares", description, Layout(replicas, micro_batches))


def fastest_alone(p: Problem) -> Baseline:
    """The one device that trains the whole batch fastest by itself (what a user with one good
    device does, leaving the rest idle)."""
    whole = [Layout((Replica((d,), (0, p.num_layers), p.work.batch_size),), 1) for d in range(len(p.devices))]
    scored = [(step_timing(p, layout).step_s, d, layout) for d, layout in enumerate(whole)]
    step_s, d, layout = min(scored, key=lambda item: item[:2])
    name = f"fastest alone ({p.devices[d].name})"
    if step_s == float("inf"):
        return Baseline(name, "the fastest device trains alone", None, "no single device holds the whole model")
    return Baseline(name, "the fastest device trains alone, the others idle", layout)


def proportional_shares(p: Problem) -> Baseline:
    """Every device a whole replica, batch shares in proportion to its measured throughput (the
    obvious hand-made fix to equal shares). A device whose proportional share rounds to nothing
    is left out."""
    description = "every device a whole replica, shares in proportion to its throughput"
    n, batch = len(p.devices), p.work.batch_size
    probe = max(1, batch // n)
    speed = [probe / float(stage_compute_s(p, d, 0, p.num_layers, probe)) for d in range(n)]
    exact = [batch * v / sum(speed) for v in speed]  # largest remainder, zero allowed
    shares = [int(x) for x in exact]
    for d in sorted(range(n), key=lambda d: (shares[d] - exact[d], d))[: batch - sum(shares)]:
        shares[d] += 1
    replicas = tuple(Replica((d,), (0, p.num_layers), k) for d, k in enumerate(shares) if k > 0)
    return Baseline("proportional shares", description, Layout(replicas, 1))


def score(p: Problem, baseline: Baseline) -> tuple[float | None, str]:
    """(predicted step seconds or None, why not) for a baseline layout."""
    if baseline.layout is None:
        return None, baseline.note
    timing = step_timing(p, baseline.layout)
    if timing.step_s != float("inf"):
        return timing.step_s, baseline.note
    for replica, t in zip(baseline.layout.replicas, timing.replicas):
        for d, mem in zip(replica.devices, t.memory_bytes):
            if mem > p.memory_bytes[d]:
                return None, (f"does not fit: {p.devices[d].name} needs {mem / 2**30:.1f} GiB "
                              f"of {p.memory_bytes[d] / 2**30:.1f} GiB")
    return None, "does not fit"
