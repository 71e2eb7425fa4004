"""The step-time model: how long a layout takes on given devices, and how much memory it needs.

A layout is data-parallel replicas, each a pipeline of stages; a stage is one device and a
contiguous layer range [start, stop). The embedding sits on the stage that starts at layer 0
and the head on the stage that ends at layer L, so every stage holds at least one layer.

The stage formulas take numpy arrays for `start` and `stop` so the search can tabulate every
range at once with exactly the code that scores a single layout.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from alloy.devices import DeviceProfile, Inventory
from alloy.errors import PlanError
from alloy.plan.cost import LORA_HEAP_RETAINED, TRAIN_WORKER_OVERHEAD_BYTES, ModelCosts, Workload, model_costs
from alloy.plan.transport import Transport, transport
from alloy.spec import ModelSpec


@dataclass(frozen=True)
class Problem:
    """Everything the timing model reads, flattened into arrays indexed by device number."""

    spec: ModelSpec
    work: Workload
    costs: ModelCosts
    devices: tuple[DeviceProfile, ...]
    flops: np.ndarray  # (D,) matmul FLOP/s in the workload's dtype
    memory_bytes: np.ndarray  # (D,) usable: free memory when measured, else capacity
    memory_bandwidth_bytes_per_s: np.ndarray  # (D,)
    link_bytes_per_s: np.ndarray  # (D, D)
    link_latency_s: np.ndarray  # (D, D)
    host_link_bytes_per_s: np.ndarray  # (D,) an accelerator's host copies (inf: a CPU, or not measured)
    # prefix sums over layers, (L+1,)
    prefix_params: np.ndarray
    prefix_step_flops: np.ndarray
    prefix_act_bytes: np.ndarray
    prefix_kv_bytes: np.ndarray
    prefix_decode_flops: np.ndarray
    prefix_kv_read_bytes: np.ndarray
    max_layer_peak_bytes_per_sample: float
    prefix_moe_layers: np.ndarray  # (L+1,) MoE layers before each boundary (0 for a dense model)
    # What the runtime pays beyond the layers' own work, measured where a profile says
    # (alloy.runtime.calibrate) and estimated otherwise: docs/PLANNER.md lists each term.
    optimizer_s_per_param: np.ndarray  # (D,) AdamW update of one parameter held
    micro_batch_overhead_s: np.ndarray  # (D,) fixed cost of one micro-batch on a pipeline stage
    collective_latency_s: float  # one all-reduce call among the workers (None measured: link latency)
    collective_bytes_per_s: float  # ring bandwidth of those all-reduces (0: use the links)
    startup_s: float | None  # launching the workers (once per run, not per step)
    # Per device: measured per-layer times for this model, replacing the FLOP-rate estimate.
    # train: (train,); infer: (prefill, decode). None where the profile carries none.
    measured: tuple = ()
    # Whether the runtime that runs this workload opens NCCL groups: training's does
    # (alloy.runtime.layout.job_transports); inference's (alloy.infer) sends over gloo only.
    nccl_usable: bool = False

    @property
    def num_layers(self) -> int:
        return self.costs.num_layers

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]


def build_problem(spec: ModelSpec, inventory: Inventory, work: Workload,
                  device_names: list[str] | None = None) -> Problem:
    if device_names is not None:
        if not device_names:
            raise PlanError("the device list is empty")
        devices = [inventory.device(n) for n in device_names]  # ConfigError names an unknown device
    else:
        devices = list(inventory.devices)
    for d in devices:
        if usable_memory_bytes(d) <= 0:
            raise PlanError(f"device {d.name!r} has no free memory")
    costs = model_costs(spec, work)
    n = len(devices)
    bw, lat = np.full((n, n), np.inf), np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            link = inventory.link(devices[a].name, devices[b].name)
            bw[a, b] = bw[b, a] = link.bandwidth_bytes_per_s
            idle = work.task == "infer" and link.idle_latency_s is not None  # ranks take turns
            lat[a, b] = lat[b, a] = link.idle_latency_s if idle else link.latency_s

    def prefix(values: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(values)])

    phases = ("train",) if work.task == "train" else ("prefill", "decode")
    measured = tuple(
        tuple(d.measured_layers(spec.hidden_size, spec.num_layers, ph) for ph in phases) for d in devices)
    measured = tuple(None if all(m is None for m in ms) else ms for ms in measured)
    collective = inventory.allreduce
    return Problem(
        optimizer_s_per_param=np.array([optimizer_s_per_param(d) for d in devices]),
        micro_batch_overhead_s=np.array([d.micro_batch_overhead_s or 0.0 for d in devices]),
        collective_latency_s=collective.latency_s if collective else math.nan,
        collective_bytes_per_s=collective.bandwidth_bytes_per_s if collective else 0.0,
        startup_s=inventory.startup_s, nccl_usable=work.task == "train",
        spec=spec, work=work, costs=costs, devices=tuple(devices), measured=measured,
        flops=np.array([d.flops(work.dtype) for d in devices]),
        memory_bytes=np.array([usable_memory_bytes(d) for d in devices], dtype=float),
        memory_bandwidth_bytes_per_s=np.array([d.memory_bandwidth_bytes_per_s for d in devices]),
        link_bytes_per_s=bw, link_latency_s=lat,
        host_link_bytes_per_s=np.array([d.host_link_bytes_per_s if d.kind != "cpu" and d.host_link_bytes_per_s
                                        else np.inf for d in devices]),
        prefix_params=prefix(costs.layer_params),
        prefix_step_flops=prefix(costs.layer_step_flops_per_sample),
        prefix_act_bytes=prefix(costs.layer_act_bytes_per_sample),
        prefix_kv_bytes=prefix(costs.layer_kv_bytes_per_sample),
        prefix_decode_flops=prefix(costs.layer_decode_flops_per_sample),
        prefix_kv_read_bytes=prefix(costs.layer_kv_read_bytes_per_sample),
        max_layer_peak_bytes_per_sample=float(costs.layer_peak_bytes_per_sample.max()),
        prefix_moe_layers=prefix((costs.layer_moe_params > 0).astype(float)),
    )


def transport_of(p: Problem, members) -> Transport:
    """The transport the runtime uses among these devices (alloy.plan.transport's rule): a
    pipeline's messages go by its whole pipeline's, since a pipeline stage sends and receives on
    one device; the collectives by every worker's."""
    return transport([p.devices[d] for d in members], p.nccl_usable)


def hop_bytes_per_s(p: Problem, a: int, b: int, how: Transport | None = None) -> float:
    """A message's rate from device a to device b as the runtime moves it (`how`: the transport
    of the pipeline it belongs to; None: the pair's own). NCCL sends device to device at the
    link's rate; gloo carries host tensors: a's host copy, the link, b's host copy, in series (a
    CPU end has no copy)."""
    if (how or transport_of(p, (a, b))) == "nccl":
        return float(p.link_bytes_per_s[a, b])
    return 1.0 / (1.0 / p.link_bytes_per_s[a, b] + 1.0 / p.host_link_bytes_per_s[a] + 1.0 / p.host_link_bytes_per_s[b])


def through_host(p: Problem, a: int, b: int, how: Transport) -> bool:
    """Whether a message between a and b copies through host memory: under gloo, when an end is
    an accelerator (whose host copies the profile prices); never under NCCL."""
    return how == "gloo" and bool(np.isfinite(p.host_link_bytes_per_s[[a, b]]).any())


# AdamW in fp32 reads weight, gradient and both moments and writes weight and moments: 28 bytes
# a parameter at the device's memory bandwidth, where no measured rate is in the profile.
ADAMW_BYTES_PER_PARAM = 28


def optimizer_s_per_param(device: DeviceProfile) -> float:
    if device.optimizer_s_per_param is not None:
        return device.optimizer_s_per_param
    return ADAMW_BYTES_PER_PARAM / device.memory_bandwidth_bytes_per_s


def usable_memory_bytes(device: DeviceProfile) -> int:
    # A measured profile's free memory is what is really left; a declared one has only capacity.
    return device.free_memory_bytes if device.free_memory_bytes is not None else device.memory_bytes


def train_micro_batches(share: int, micro_batches: int, stages: int) -> int:
    """The micro-batches a training replica really runs (the runtime reads this too): a one-stage
    replica runs its whole share at once; a pipeline runs the largest divisor of its share up to
    the plan's count, since a pipeline schedule needs micro-batches of equal size."""
    if stages == 1:
        return 1
    return largest_divisor(share, micro_batches)


@functools.lru_cache(maxsize=1 << 16)
def largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is <= at_most, in O(sqrt n): the search asks this for every
    share of a 65536-sample batch."""
    if at_most >= n:
        return n
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            best = max([best] + [c for c in (d, n // d) if c <= at_most])
    return best


def micro_batching(p: Problem, share: int, micro_batches: int, stages: int) -> tuple[int, float, int]:
    """(micro-batches this replica runs, mean samples per micro-batch, largest micro-batch)."""
    if p.work.task == "train":
        m = train_micro_batches(share, micro_batches, stages)
        return m, share / m, share // m
    m = min(micro_batches, share)
    return m, share / m, math.ceil(share / m)


# ---- one stage, vectorised over layer ranges -------------------------------------------------

def stage_params(p: Problem, start, stop):
    c = p.costs
    params = p.prefix_params[stop] - p.prefix_params[start]
    first, last = (start == 0), (stop == p.num_layers)
    # Tied embeddings: the last stage needs its own copy of the matrix, unless it is also the first.
    head_here = np.logical_and(last, np.logical_not(first)) if c.tied else last
    return params + c.embed_params * first + c.head_params * head_here


def stage_adapter_params(p: Problem, start, stop):
    """LoRA adapter parameters of layers [start, stop) (0 in full training): the only trainable ones."""
    return (stop - start) * p.costs.layer_adapter_params


def stage_weight_bytes(p: Problem, start, stop):
    return stage_params(p, start, stop) * p.costs.dtype_bytes


def interpolate(batch, values, at: float) -> float:
    """Linear in batch size between measured rows; beyond them, the line through the end rows."""
    if not values:
        return 0.0
    xs, ys = np.asarray(batch, float), np.asarray(values, float)
    if len(xs) == 1:
        return float(ys[0] * at / xs[0])
    if at <= xs[0]:
        lo, hi = 0, 1
    elif at >= xs[-1]:
        lo, hi = len(xs) - 2, len(xs) - 1
    else:
        return float(np.interp(at, xs, ys))
    return float(ys[lo] + (ys[hi] - ys[lo]) * (at - xs[lo]) / (xs[hi] - xs[lo]))


def measured_stage_s(m, start, stop, num_layers: int, batch: float):
    """Stage time from a measured per-layer profile: layers x time of one layer, plus embed/head."""
    layers = stop - start
    return (layers * interpolate(m.batch, m.layer_s, batch)
            + (start == 0) * interpolate(m.batch, m.first_s, batch)
            + (stop == num_layers) * interpolate(m.batch, m.last_s, batch))


def stage_compute_s(p: Problem, device: int, start, stop, mb_samples: float):
    """Busy time of one micro-batch on one stage: forward+backward (train), or prefill+decode (infer)."""
    c, last = p.costs, (stop == p.num_layers)
    measured = p.measured[device] if p.measured else None
    if measured is not None and all(m is not None for m in measured):
        if p.work.task == "train":
            return measured_stage_s(measured[0], start, stop, p.num_layers, mb_samples)
        prefill, decode = measured
        busy_s = measured_stage_s(prefill, start, stop, p.num_layers, mb_samples * p.work.seq_len)
        return busy_s + p.work.new_tokens * measured_stage_s(decode, start, stop, p.num_layers, mb_samples)
    flops = p.prefix_step_flops[stop] - p.prefix_step_flops[start] + c.head_step_flops_per_sample * last
    busy_s = mb_samples * flops / p.flops[device]
    if p.work.task == "infer" and p.work.new_tokens:
        busy_s = busy_s + p.work.new_tokens * decode_token_s(p, device, start, stop, mb_samples)
    return busy_s


def decode_read_and_flops(p: Problem, start, stop, mb_samples: float):
    """(bytes read, FLOPs) of one generated token for a micro-batch on layers [start, stop)."""
    c, last = p.costs, (stop == p.num_layers)
    # A MoE layer's decode step reads only the experts its tokens picked
    unread = (p.prefix_moe_layers[stop] - p.prefix_moe_layers[start]) * c.expert_params * (
        c.num_experts - c.experts_read(mb_samples)) * c.dtype_bytes
    read_bytes = stage_weight_bytes(p, start, stop) - unread + mb_samples * (
        p.prefix_kv_read_bytes[stop] - p.prefix_kv_read_bytes[start])
    flops = mb_samples * (p.prefix_decode_flops[stop] - p.prefix_decode_flops[start]
                          + c.head_decode_flops_per_sample * last)
    return read_bytes, flops


def decode_token_s(p: Problem, device: int, start, stop, mb_samples: float):
    """One generated token for a micro-batch: the slower of reading weights+KV and the matmuls."""
    read_bytes, flops = decode_read_and_flops(p, start, stop, mb_samples)
    return np.maximum(read_bytes / p.memory_bandwidth_bytes_per_s[device], flops / p.flops[device])


def send_s(p: Problem, src: int, dst: int | None, mb_samples: float, how: Transport | None = None) -> float:
    """Hidden states of one micro-batch to the next stage (and their gradient back, when training),
    over `how` (the pipeline's transport; None: the pair's own)."""
    if dst is None:
        return 0.0
    bw, lat = hop_bytes_per_s(p, src, dst, how), p.link_latency_s[src, dst]
    one_way_s = mb_samples * p.costs.boundary_bytes_per_sample / bw + lat
    if p.work.task == "train":
        return 2 * one_way_s
    return one_way_s + p.work.new_tokens * (mb_samples * p.costs.boundary_decode_bytes_per_sample / bw + lat)


def quantized_base_here(p: Problem, device: int | None) -> bool:
    """QLoRA's block formats run on CPU workers (Alloy's kernels); a GPU stage of the same run holds
    its frozen base in float, as plain LoRA (alloy.runtime.engine). None: any device, the least need."""
    return device is None or p.devices[device].kind == "cpu"


def stage_memory_bytes(p: Problem, start, stop, in_flight: int, mb_max_samples: int, share: int,
                       device: int | None = None):
    """Peak bytes on a stage (on `device`). 1F1B keeps `in_flight` micro-batches of activations
    alive at once."""
    c, last = p.costs, (stop == p.num_layers)
    state = stage_params(p, start, stop) * c.param_state_bytes
    state = state + stage_adapter_params(p, start, stop) * c.adapter_state_bytes
    if quantized_base_here(p, device):
        state = state - (stop - start) * c.layer_quant_saving_bytes
    transient = mb_max_samples * (p.max_layer_peak_bytes_per_sample + c.head_peak_bytes_per_sample * last)
    if p.work.task == "train":
        state = state + TRAIN_WORKER_OVERHEAD_BYTES
        kept = in_flight * mb_max_samples * (p.prefix_act_bytes[stop] - p.prefix_act_bytes[start])
        if c.lora:
            kept = kept * (1 + LORA_HEAP_RETAINED)
    else:
        kept = share * (p.prefix_kv_bytes[stop] - p.prefix_kv_bytes[start])  # every request's KV cache
    return state + kept + transient


# ---- whole layouts ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Replica:
    devices: tuple[int, ...]  # pipeline order
    cuts: tuple[int, ...]  # len(devices)+1 layer boundaries, 0 ... L
    share: int  # samples of the global batch

    def stages(self):
        return zip(self.devices, self.cuts[:-1], self.cuts[1:])


@dataclass(frozen=True)
class Layout:
    replicas: tuple[Replica, ...]
    micro_batches: int


@dataclass(frozen=True)
class ReplicaTiming:
    time_s: float  # inf when a stage does not fit
    slot_s: tuple[float, ...]  # per stage: compute + send to the next stage, one micro-batch
    compute_s: tuple[float, ...]
    memory_bytes: tuple[float, ...]
    micro_batches: int
    optimizer_s: float = 0.0  # the slowest stage's optimizer update, after the gradient sync


def pipeline_time_s(slot_s, micro_batches: int):
    """1F1B: the first micro-batch crosses every stage, the rest follow at the slowest stage's pace."""
    return sum(slot_s) + (micro_batches - 1) * max(slot_s)


def stage_optimizer_s(p: Problem, device: int, start, stop):
    """The optimizer update of a stage's parameters (training only)."""
    if p.work.task != "train":
        return 0.0 * start
    trainable = stage_adapter_params(p, start, stop) if p.costs.lora else stage_params(p, start, stop)
    return trainable * p.optimizer_s_per_param[device]


def stage_overhead_s(p: Problem, device: int, stages: int) -> float:
    """Fixed cost of one micro-batch on a pipeline stage (schedule bookkeeping, message set-up)."""
    return float(p.micro_batch_overhead_s[device]) if stages > 1 else 0.0


def replica_timing(p: Problem, devices: tuple[int, ...], cuts: tuple[int, ...], share: int,
                   micro_batches: int) -> ReplicaTiming:
    """A replica's time per step: its pipeline, then (after the gradient sync, which `allreduce_s`
    adds) its slowest stage's optimizer update. Between two syncs each rank runs its update and
    then the next step's pipeline, so the update belongs to the replica's own time."""
    n = len(devices)
    m, mb, mb_max = micro_batching(p, share, micro_batches, n)
    how = transport_of(p, devices)
    slots, computes, mems, fits, optimizer = [], [], [], True, 0.0
    for k, (d, a, b) in enumerate(zip(devices, cuts[:-1], cuts[1:])):
        compute = float(stage_compute_s(p, d, a, b, mb)) + stage_overhead_s(p, d, n)
        slots.append(compute + send_s(p, d, devices[k + 1] if k + 1 < n else None, mb, how))
        computes.append(compute)
        mem = float(stage_memory_bytes(p, a, b, min(n - k, m), mb_max, share, d))
        mems.append(mem)
        fits &= mem <= p.memory_bytes[d]
        optimizer = max(optimizer, float(stage_optimizer_s(p, d, a, b)))
    time_s = pipeline_time_s(slots, m) + optimizer if fits else math.inf
    return ReplicaTiming(time_s, tuple(slots), tuple(computes), tuple(mems), m, optimizer)


MAX_BUCKET_BYTES = 25 * 1024**2  # as DDP: big enough that the per-call latency stays small
MIN_BUCKET_BYTES = 1024**2


def gradient_bucket_bytes(total_bytes: float, overlap: bool) -> float:
    """The runtime's gradient bucket size. Overlapped with the backward: a quarter of the
    gradient, within 1-25 MiB, so only the last bucket (<= a quarter) waits after the backward.
    After the backward: as few calls as the 25 MiB cap allows (each call costs a latency)."""
    if not overlap:
        return MAX_BUCKET_BYTES
    return min(MAX_BUCKET_BYTES, max(MIN_BUCKET_BYTES, total_bytes / 4))


def overlaps_backward(groups) -> bool:
    """Whether the runtime all-reduces gradients during the backward: when every replica is one
    stage (pure data parallel). A pipeline's backward is its schedule's, so it syncs after."""
    return len(groups) > 1 and all(len(g) == 1 for g in groups)


BACKWARD_SHARE = 2 / 3  # of a training step's compute (the backward costs twice the forward)


@dataclass(frozen=True)
class SyncCost:
    """A training step's collectives, split by when they can run."""

    hidden_s: float = 0.0  # gradient buckets before the last: during the backward, when it overlaps
    exposed_s: float = 0.0  # after the slowest replica's backward: the rest, tied copies, the scalars
    first_bucket_fraction: float = 0.0  # of the gradient: the backward produces it before any call starts

    @property
    def total_s(self) -> float:
        return self.hidden_s + self.exposed_s

    def spill_s(self, compute_s: float) -> float:
        """What of the hidden buckets a one-stage replica's backward of `compute_s` cannot cover."""
        window_s = compute_s * BACKWARD_SHARE * (1 - self.first_bucket_fraction)
        return max(0.0, self.hidden_s - window_s)


def sync_cost(p: Problem, groups: list[tuple[int, ...]]) -> SyncCost:
    """Every collective of a training step as the runtime runs them, over every worker's
    transport (`transport_of`; `collective_transport` in the plan):

    - the gradient among replicas: a ring all-reduce of the whole model in buckets
      (`gradient_bucket_bytes`); pure data parallel starts each bucket as soon as the backward has
      produced it, so all but the last can hide behind the backward;
    - a tied embedding's two copies (first and last stage of a pipeline) when there is one replica;
    - one small all-reduce over every worker: the loss, the gradient norm and the step times.

    Each call costs the collective latency; bytes cost the ring bandwidth. Both come from the
    inventory's measured all-reduce when it has one and the workers are on gloo (calibration times
    gloo on host tensors), else from the slowest link between the workers. Under gloo an
    accelerator copies each gradient bucket out and the sum back in; under NCCL the GPUs reduce
    on the device, no host copy.
    """
    workers = [d for g in groups for d in g]
    if len(workers) < 2 or p.work.task != "train":
        return SyncCost()
    r, c = len(groups), p.costs
    nccl = transport_of(p, workers) == "nccl"
    if p.collective_bytes_per_s > 0 and not nccl:
        bw = p.collective_bytes_per_s
        call_s = lambda n: p.collective_latency_s  # noqa: E731  (measured per call)
    else:
        owner = np.full(len(p.devices), -1)
        for i, g in enumerate(groups):
            owner[list(g)] = i
        used = owner >= 0
        mask = used[:, None] & used[None, :] & ~np.eye(len(p.devices), dtype=bool)
        if r > 1:  # the gradient crosses replicas: their slowest link paces the ring
            mask &= owner[:, None] != owner[None, :]
        bw, lat = p.link_bytes_per_s[mask].min(), p.link_latency_s[mask].max()
        call_s = lambda n: 2 * (n - 1) * lat  # noqa: E731  (a ring: 2 (n - 1) hops a call)
    exposed_s = call_s(len(workers))  # the scalars, every step
    if r > 1:
        total_bytes = c.total_param_bytes
        bucket = gradient_bucket_bytes(total_bytes, overlaps_backward(groups))
        calls = math.ceil(total_bytes / bucket)
        host_s_per_byte = 0.0 if nccl else 2.0 / p.host_link_bytes_per_s[workers].min()
        bucket_s = lambda n: call_s(r) + 2 * (r - 1) / r * n / bw + n * host_s_per_byte  # noqa: E731
        last = total_bytes - (calls - 1) * bucket
        full_s = (calls - 1) * bucket_s(bucket) if calls > 1 else 0.0  # never 0 x inf on an unusable link
        if overlaps_backward(groups):
            return SyncCost(hidden_s=full_s, exposed_s=exposed_s + bucket_s(last),
                            first_bucket_fraction=min(1.0, bucket / total_bytes))
        exposed_s += full_s + bucket_s(last)
    elif c.tied and len(groups[0]) > 1 and not c.lora:  # LoRA: the embeddings are frozen
        embed_bytes = c.embed_params * c.dtype_bytes
        calls = math.ceil(embed_bytes / gradient_bucket_bytes(embed_bytes, False))
        exposed_s += calls * call_s(2) + embed_bytes / bw
    return SyncCost(exposed_s=exposed_s)


def allreduce_s(p: Problem, groups: list[tuple[int, ...]]) -> float:
    """Every collective of a step, hidden or not: a lower bound on what they add to any layout."""
    return sync_cost(p, groups).exposed_s


def synced_time_s(p: Problem, timing: ReplicaTiming, sync: SyncCost) -> float:
    """A replica's time until the last overlapped bucket is through: its own time, plus what of
    the hidden buckets its backward could not cover (one-stage replicas only)."""
    if len(timing.compute_s) != 1 or not sync.hidden_s:
        return timing.time_s
    return timing.time_s + sync.spill_s(timing.compute_s[0])


@dataclass(frozen=True)
class StepTiming:
    step_s: float
    replicas: tuple[ReplicaTiming, ...]
    allreduce_s: float  # the collectives' time not hidden behind compute, on the slowest replica


def step_timing(p: Problem, layout: Layout) -> StepTiming:
    """The slowest replica (counting what its backward could not hide of the gradient all-reduce)
    bounds the step; the exposed collectives follow it."""
    timings = tuple(replica_timing(p, r.devices, r.cuts, r.share, layout.micro_batches)
                    for r in layout.replicas)
    sync = sync_cost(p, [r.devices for r in layout.replicas])
    synced = [synced_time_s(p, t, sync) for t in timings]
    slowest = int(np.argmax(synced))
    spill_s = synced[slowest] - timings[slowest].time_s if math.isfinite(synced[slowest]) else 0.0
    return StepTiming(synced[slowest] + sync.exposed_s, timings, sync.exposed_s + spill_s)
