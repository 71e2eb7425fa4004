"""Offline decode throughput of a layer placement on Helix's prototype (vLLM workers, a host loop).

Two bounds, the smaller one is the prediction:

1. Capacity (`capacity_bound`): an LP over layers — every layer served at rate T, no device busy
   more than 100% — with each device's tokens/s at its largest decode batch (vLLM's cap from
   `machine_layer_limits.csv`, else its KV room), counting the prompt work each request brings.
2. Requests in flight (`in_flight_bound`), which is what bounds the prototype. Its offline host
   admits a new request only while the most-used layer's KV cache is below a feeding mark, each
   request reserving its prompt + output tokens on every node of its route. So the cluster holds
   N = FEED_HWM * (KV tokens of the bottleneck layer) / (750 + 240) requests. Decoding is
   autoregressive: a request's next token starts only after its last one has crossed every stage,
   so tokens/s = N / R, R the time of one token end to end. The requests travel together (each
   stage batches all of its requests, one convoy per route): R = sum over the route of
   layers * (measured decode time at that batch + per-layer iteration overhead) / (1 - prompt share)
   + one hop per stage. X and R depend on each other (prompt share ~ X); a fixed point solves it.

Constants and where they come from:
- FEED_HWM 0.8 and the (prompt + 240) reservation: the Helix artifact's offline host (feeding_hwm
  in artifact_evaluation/single_cluster/step5_start_host.py, KV expectation in llm_sys).
- KV room per machine type: `kv_caps` (read off the vLLM caps file, no throughput used); beyond the
  layer counts the caps were profiled at, the physical bound `kv_caps.physical_budgets` (0.9 x VRAM
  minus the caps file's median reserve per GPU). A node keeps at least one request's KV.
- `overhead_s_per_layer`: the one fitted number, passed in by the caller (`fit_overhead`), fitted
  on the three LLaMA-30B Helix sub-cluster decode latencies, which are not among the checked totals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog

from alloy.devices import DeviceProfile, Inventory
from alloy.errors import PlanError
from alloy.fidelity.kv_caps import kv_bytes_per_token_layer, weight_bytes
from alloy.plan.timing import interpolate
from alloy.spec import ModelSpec

PROMPT_TOKENS = 750  # Azure Conversation trace means (data README)
OUTPUT_TOKENS = 240
FEED_HWM = 0.8  # Helix offline host: admit while the bottleneck layer's KV use is below this
HOP_S = 1e-3  # the declared link latency; a token's hidden state is 16 KiB, bandwidth is moot


@dataclass(frozen=True)
class DeviceLoad:
    name: str
    layers: tuple[int, int]
    kv_tokens: float  # KV slots per layer (tokens) this device holds
    max_batch: float  # largest decode batch it runs (vLLM cap or KV room)
    tokens_per_s: float  # generated tokens/s through each of its layers at max_batch
    share: float = 0.0  # fraction of all tokens that pass through it (from the LP flow)


@dataclass(frozen=True)
class ServingPrediction:
    tokens_per_s: float
    bound: str  # "capacity" or "in-flight"
    devices: tuple[DeviceLoad, ...]
    bottleneck: str
    in_flight: float  # requests the host keeps in the cluster
    token_round_trip_s: float


def _layer_s(device: DeviceProfile, spec: ModelSpec, phase: str, batch: float) -> float:
    m = device.measured_layers(spec.hidden_size, spec.num_layers, phase)
    if m is None:
        raise PlanError(f"device {device.name!r} has no measured {phase} profile for this model")
    return interpolate(m.batch, m.layer_s, batch)


def _prompt_s_per_token(device: DeviceProfile, spec: ModelSpec) -> float:
    """Prompt work per generated token and layer (one 750-token prompt per 240 outputs)."""
    return _layer_s(device, spec, "prefill", PROMPT_TOKENS) / OUTPUT_TOKENS


def device_load(device: DeviceProfile, spec: ModelSpec, layers: tuple[int, int], budget_bytes: float,
                decode_caps: dict[int, int] | None = None, physical_bytes: float | None = None) -> DeviceLoad:
    """`budget_bytes`: the caps-derived budget of its type; `physical_bytes`: the physical bound, used instead
    where the node holds more layers than the caps were profiled at (see `kv_caps`)."""
    a, b = layers
    k = b - a
    if decode_caps and k > max(decode_caps) and physical_bytes is not None:
        budget_bytes = physical_bytes
    free = budget_bytes - weight_bytes(spec, k)
    # A deployment that ran holds at least one request: vLLM does not start without KV room for one
    # sequence, so a node at the edge of its memory (the 70B T4 pipeline) keeps one request's KV.
    kv_tokens = max(free / (k * kv_bytes_per_token_layer(spec)), PROMPT_TOKENS + OUTPUT_TOKENS)
    max_batch = kv_tokens / (PROMPT_TOKENS + OUTPUT_TOKENS)
    if decode_caps and k in decode_caps:
        max_batch = min(max_batch, decode_caps[k])
    per_token_s = _layer_s(device, spec, "decode", max_batch) / max_batch + _prompt_s_per_token(device, spec)
    return DeviceLoad(device.name, layers, kv_tokens, max_batch, 1.0 / per_token_s)


def capacity_bound(loads: list[DeviceLoad], num_layers: int) -> tuple[float, list[float]]:
    """max T: sum_i x[i,l] = T for every layer l, sum_l x[i,l] / cap_i <= 1; returns T and shares."""
    var = [(i, l) for i, d in enumerate(loads) if d.tokens_per_s > 0 for l in range(*d.layers)]
    if len({l for _, l in var}) < num_layers:
        return 0.0, [0.0] * len(loads)
    n = len(var) + 1  # last variable is T
    a_eq = np.zeros((num_layers, n))
    a_ub = np.zeros((len(loads), n))
    for j, (i, l) in enumerate(var):
        a_eq[l, j] = 1.0
        a_ub[i, j] = 1.0 / loads[i].tokens_per_s
    a_eq[:, -1] = -1.0
    cost = np.zeros(n)
    cost[-1] = -1.0
    res = linprog(cost, A_ub=a_ub, b_ub=np.ones(len(loads)), A_eq=a_eq, b_eq=np.zeros(num_layers),
                  bounds=[(0, None)] * n, method="highs")
    if res.status != 0:
        raise PlanError(f"throughput LP failed: {res.message}")
    total = float(res.x[-1])
    shares = [0.0] * len(loads)
    for j, (i, _) in enumerate(var):  # mean over its layers of the fraction of tokens it serves
        shares[i] += res.x[j] / total / (loads[i].layers[1] - loads[i].layers[0]) if total > 0 else 0.0
    return total, shares


def in_flight_bound(inventory: Inventory, spec: ModelSpec, loads: list[DeviceLoad],
                    overhead_s_per_layer: float) -> tuple[float, float, float]:
    """(tokens/s, requests in flight, token round trip s) under the host's KV feeding rule."""
    kv_per_layer = np.zeros(spec.num_layers)
    for d in loads:
        kv_per_layer[d.layers[0]:d.layers[1]] += d.kv_tokens
    # A pipeline that runs at all holds at least one request.
    in_flight = max(FEED_HWM * kv_per_layer.min() / (PROMPT_TOKENS + OUTPUT_TOKENS), 1.0)
    tokens_per_s, round_trip_s = 0.0, 0.0
    for _ in range(100):  # fixed point: the prompt share of each stage grows with throughput
        round_trip_s = HOP_S
        for d in loads:
            if d.share <= 0:
                continue
            device, k = inventory.device(d.name), d.layers[1] - d.layers[0]
            batch = max(in_flight * d.share, 1.0)
            prompt_busy = min(tokens_per_s * d.share * k * _prompt_s_per_token(device, spec), 0.9)
            stage_s = k * (_layer_s(device, spec, "decode", batch) + overhead_s_per_layer) / (1 - prompt_busy)
            round_trip_s += d.share * (stage_s + HOP_S)
        previous, tokens_per_s = tokens_per_s, 0.5 * tokens_per_s + 0.5 * in_flight / round_trip_s
        if abs(tokens_per_s - previous) <= 1e-6 * tokens_per_s:
            break
    return tokens_per_s, in_flight, round_trip_s


def predict_throughput(inventory: Inventory, spec: ModelSpec, placement: dict[str, tuple[int, int]],
                       budgets: dict[str, float], overhead_s_per_layer: float,
                       decode_caps: dict[str, dict[int, int]] | None = None,
                       physical: dict[str, float] | None = None) -> ServingPrediction:
    """Offline decode tokens/s of `placement` (device name -> [first, stop) layers).

    `budgets`: machine type (DeviceProfile.model) -> bytes for weights + KV (`kv_caps.kv_budgets`);
    `decode_caps`: machine type -> {layers: vLLM's max decode batch}, optional;
    `physical`: machine type -> physical weights + KV bound, used beyond the profiled layer counts.
    """
    loads = []
    for name, layers in placement.items():
        device = inventory.device(name)
        if device.model not in budgets:
            raise PlanError(f"no KV budget for machine type {device.model!r}")
        loads.append(device_load(device, spec, layers, budgets[device.model], (decode_caps or {}).get(device.model),
                                 (physical or {}).get(device.model)))
    capacity, shares = capacity_bound(loads, spec.num_layers)
    loads = [DeviceLoad(d.name, d.layers, d.kv_tokens, d.max_batch, d.tokens_per_s, s) for d, s in zip(loads, shares)]
    if capacity <= 0:
        return ServingPrediction(0.0, "capacity", tuple(loads), min(loads, key=lambda d: d.max_batch).name, 0.0, 0.0)
    flight, in_flight, round_trip_s = in_flight_bound(inventory, spec, loads, overhead_s_per_layer)
    if capacity <= flight:
        busy = max(loads, key=lambda d: d.share * (d.layers[1] - d.layers[0]) / max(d.tokens_per_s, 1e-9))
        return ServingPrediction(capacity, "capacity", tuple(loads), busy.name, in_flight, round_trip_s)
    # In-flight bound: the layer with the least KV limits how many requests the host admits.
    tightest = min(loads, key=lambda d: d.kv_tokens)
    return ServingPrediction(flight, "in-flight", tuple(loads), tightest.name, in_flight, round_trip_s)


def fit_overhead(inventory_by_chain: list[tuple[Inventory, dict[str, tuple[int, int]], float, float]],
                 spec: ModelSpec) -> float:
    """Per-layer iteration overhead (s) from measured chains: [(inventory, placement, tok/s, s/token)].

    For each chain, Little's law gives the requests in flight (tok/s * s/token); the measured token
    round trip minus hops and the profiled decode time at that batch, per layer, is the overhead the
    profiles do not see (vLLM's per-iteration host work, message handling). Mean over the chains.
    """
    fits = []
    for inventory, placement, tokens_per_s, round_trip_s in inventory_by_chain:
        in_flight = tokens_per_s * round_trip_s
        base_s, weight = (len(placement) + 1) * HOP_S, 0.0
        for name, (a, b) in placement.items():
            device, k = inventory.device(name), b - a
            scale = 1 / (1 - tokens_per_s * k * _prompt_s_per_token(device, spec))
            base_s += k * _layer_s(device, spec, "decode", in_flight) * scale
            weight += k * scale
        fits.append((round_trip_s - base_s) / weight)
    return float(np.mean(fits))
