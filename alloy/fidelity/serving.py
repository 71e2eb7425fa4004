"""Offline decode throughput of a layer placement on a serving cluster (Helix-style).

Each device holds a contiguous layer range. Its KV memory bounds how many requests it can keep
(`max_requests`), and at that batch its measured per-layer profile gives how many generated
tokens per second it can push through each of its layers, counting the prompt work each request
brings (the trace's prompt : output ratio). The cluster's throughput is then the largest flow T
such that every layer is served at rate T and no device is busy more than 100% of the time — a
linear program (fractional max-flow over layers; it lets a request leave a device mid-range, as
Helix's max-flow scheduler may).

A pipeline whose memory allows only a few requests in flight is latency bound instead: its
throughput is at most requests / (time of one token through every stage + one hop per stage).
Both bounds are computed; the smaller one is the prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from alloy.devices import DeviceProfile, Inventory
from alloy.errors import PlanError
from alloy.plan.cost import Workload, model_costs
from alloy.plan.timing import interpolate
from alloy.spec import ModelSpec

PROMPT_TOKENS = 750  # Azure Conversation trace means (data README)
OUTPUT_TOKENS = 240
USABLE_MEMORY = 0.9  # vLLM's gpu_memory_utilization in the runs
HOP_S = 1e-3  # the declared link latency; hidden states of a token are 16 KiB, bandwidth is moot


@dataclass(frozen=True)
class DeviceLoad:
    name: str
    layers: tuple[int, int]
    max_requests: int  # KV capacity at the trace's full context
    tokens_per_s: float  # generated tokens/s through each of its layers, at max_requests
    utilisation: float = 0.0  # of the solved flow


@dataclass(frozen=True)
class ServingPrediction:
    tokens_per_s: float
    bound: str  # "capacity" or "latency"
    devices: tuple[DeviceLoad, ...]
    bottleneck: str


def _layer_s(device: DeviceProfile, spec: ModelSpec, phase: str, batch: float) -> float:
    m = device.measured_layers(spec.hidden_size, spec.num_layers, phase)
    if m is None:
        raise PlanError(f"device {device.name!r} has no measured {phase} profile for this model")
    return interpolate(m.batch, m.layer_s, batch)


def device_load(device: DeviceProfile, spec: ModelSpec, layers: tuple[int, int]) -> DeviceLoad:
    work = Workload(task="infer", batch_size=1, seq_len=PROMPT_TOKENS, dtype="fp16", new_tokens=OUTPUT_TOKENS)
    c = model_costs(spec, work)
    a, b = layers
    k = b - a
    weights = c.layer_params[a:b].sum() * c.dtype_bytes
    weights += c.embed_params * c.dtype_bytes * (a == 0) + c.head_params * c.dtype_bytes * (b == spec.num_layers)
    kv_per_request = c.layer_kv_bytes_per_sample[a:b].sum()
    free = USABLE_MEMORY * device.memory_bytes - weights
    requests = int(max(free, 0) // kv_per_request)
    if requests < 1:
        return DeviceLoad(device.name, layers, 0, 0.0)
    # Per generated token and layer: its share of a decode step, plus its request's prompt tokens.
    decode_s = _layer_s(device, spec, "decode", requests) / requests
    prompt_s = PROMPT_TOKENS / OUTPUT_TOKENS * _layer_s(device, spec, "prefill", PROMPT_TOKENS) / PROMPT_TOKENS
    return DeviceLoad(device.name, layers, requests, 1.0 / (decode_s + prompt_s))


def capacity_bound(loads: list[DeviceLoad], num_layers: int) -> tuple[float, list[float]]:
    """max T: sum_i x[i,l] = T for every layer l, sum_l x[i,l] / cap_i <= 1 per device."""
    var = [(i, l) for i, d in enumerate(loads) if d.tokens_per_s > 0 for l in range(*d.layers)]
    n = len(var) + 1  # last variable is T
    covered = {l for _, l in var}
    if len(covered) < num_layers:
        return 0.0, [0.0] * len(loads)
    a_eq = np.zeros((num_layers, n))
    for j, (_, l) in enumerate(var):
        a_eq[l, j] = 1.0
    a_eq[:, -1] = -1.0
    a_ub = np.zeros((len(loads), n))
    for j, (i, _) in enumerate(var):
        a_ub[i, j] = 1.0 / loads[i].tokens_per_s
    cost = np.zeros(n)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=a_ub, b_ub=np.ones(len(loads)), A_eq=a_eq, b_eq=np.zeros(num_layers),
                  bounds=[(0, None)] * n, method="highs")
    if res.status != 0:
        raise PlanError(f"throughput LP failed: {res.message}")
    return float(res.x[-1]), list(a_ub @ res.x)


def latency_bound(inventory: Inventory, spec: ModelSpec, loads: list[DeviceLoad]) -> float:
    """For a single chain of disjoint ranges: requests in flight / time of one token end to end."""
    chain = sorted(loads, key=lambda d: d.layers)
    if any(x.layers[1] != y.layers[0] for x, y in zip(chain, chain[1:])):
        return float("inf")  # overlapping ranges: many paths, the capacity bound applies
    in_flight = min(d.max_requests for d in chain)
    if in_flight < 1:
        return 0.0
    per_stage = in_flight / len(chain)  # requests spread over the stages, each stage batches its share
    token_s = sum((d.layers[1] - d.layers[0]) * _layer_s(inventory.device(d.name), spec, "decode", per_stage)
                  + HOP_S for d in chain) + HOP_S
    return in_flight / token_s


def predict_throughput(inventory: Inventory, spec: ModelSpec,
                       placement: dict[str, tuple[int, int]]) -> ServingPrediction:
    """Offline decode tokens/s of `placement` (device name -> [first, stop) layers)."""
    loads = [device_load(inventory.device(n), spec, r) for n, r in placement.items()]
    capacity, busy = capacity_bound(loads, spec.num_layers)
    latency = latency_bound(inventory, spec, loads)
    loads = [DeviceLoad(d.name, d.layers, d.max_requests, d.tokens_per_s, u) for d, u in zip(loads, busy)]
    tokens = min(capacity, latency)
    bound = "capacity" if capacity <= latency else "latency"
    if bound == "capacity":
        worst = max(loads, key=lambda d: (d.utilisation, -d.tokens_per_s))
    else:
        worst = min(loads, key=lambda d: d.max_requests)
    return ServingPrediction(tokens, bound, tuple(loads), worst.name)
