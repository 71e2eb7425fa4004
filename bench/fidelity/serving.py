"""Offline decode throughput of a layer placement on Helix's prototype (vLLM workers, a host loop).

Two bounds, the smaller one is the prediction:

1. Capacity (`capacity_bound`): an LP over layers — every layer served at rate T, no device busy
   more than 100% — with each device's tokens/s at its largest decode batch (vLLM's cap from
   `machine_layer_limits.csv`, else its KV room), counting the prompt work each request brings.
2. Requests in flight (`in_flight_bound`), which is what bounds the prototype: decoding is
   autoregressive, a request's next token starts only after its last one has crossed every stage,
   so tokens/s = N / R, N the requests in the cluster and R the time of one token end to end.
   - N depends on the host loop (`Host`). The max-flow host admits a new request only while the
     most-used layer's KV cache is below a feeding mark, each request reserving its prompt + output
     tokens on every node of its route: N = FEED_HWM * (KV tokens of the bottleneck layer) /
     (750 + 240). The Swarm and random hosts launch a fixed number of requests and replace each
     finished one: N = that count, or the KV room if smaller (vLLM queues the rest).
   - R: the requests travel together (each stage batches all of its requests, one convoy per
     route): R = sum over the route of [layers * measured decode time at that batch + overhead]
     / (1 - prompt share) + one hop per stage + the host's time for the requests in flight. X and R
     depend on each other (prompt share ~ X); a fixed point solves it.
   - A stage whose vLLM cap per iteration is below its share of the convoy runs it in parts, which
     then travel separately (`convoy_groups`: first fit, the largest group every stage admits).
   - Routes: the capacity LP's flow, or the routes the run logged (`with_routes`), where a run's
     requests were split over nodes holding the same layers by weights the placement does not give.

Constants and where they come from:
- FEED_HWM 0.8 and the (prompt + 240) reservation: the Helix artifact's offline max-flow host
  (feeding_hwm, and the scheduler's KV expectation with output-length ratio 1).
- Launch counts of the fixed-count hosts: the artifact's host script (`validate.HOSTS`).
- vLLM's per-iteration decode caps: the caps file (`derived/machine_layer_limits.csv`), read by `kv_caps`.
- KV room per machine type: `kv_caps` (read off the vLLM caps file, no throughput used); beyond the
  layer counts the caps were profiled at, the physical bound `kv_caps.physical_budgets`. A node
  keeps at least one request's KV.
- `Overhead`: the three fitted numbers, passed in by the caller (`fit_overhead`), fitted on measured
  runs that are not among the checked totals (see `validate.overhead_runs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import linprog, nnls

from alloy.devices import DeviceProfile, Inventory
from alloy.errors import PlanError
from bench.fidelity.kv_caps import kv_bytes_per_token_layer, weight_bytes
from alloy.plan.timing import interpolate
from alloy.spec import ModelSpec

PROMPT_TOKENS = 750  # Azure Conversation trace means (data README)
OUTPUT_TOKENS = 240
FEED_HWM = 0.8  # Helix offline max-flow host: admit while the bottleneck layer's KV use is below this
HOP_S = 1e-3  # the declared link latency; a token's hidden state is 16 KiB, bandwidth is moot
Placement = dict[str, tuple[int, int]]


@dataclass(frozen=True)
class Host:
    """How the host keeps requests in the cluster. `launch` None: the max-flow host, feeding by KV
    use; a number: a fixed-count host (Swarm / random scheduling) that launched that many requests;
    `math.inf`: a fixed-count host whose count is not published (the KV room then sets N)."""
    launch: float | None = None


MAXFLOW = Host()


@dataclass(frozen=True)
class Overhead:
    """Token round-trip time the per-layer profiles do not see.

    `per_layer_s`: per layer a stage runs (vLLM's per-layer work outside the profiled kernels);
    `per_request_s`: per request in a stage's batch (each worker handles and forwards every request's
    message and sequence state one by one; stages holding the same layers do this in parallel);
    `host_per_request_s`: per request in flight, once per token (the host is one Python loop that, for
    every request and every token, collects it, updates the scheduler's KV expectation and launches
    the next step, one request after another)."""
    per_layer_s: float = 0.0
    per_request_s: float = 0.0
    host_per_request_s: float = 0.0


@dataclass(frozen=True)
class DeviceLoad:
    name: str
    layers: tuple[int, int]
    kv_tokens: float  # KV slots per layer (tokens) this device holds
    max_batch: float  # largest decode batch it runs (vLLM cap or KV room)
    tokens_per_s: float  # generated tokens/s through each of its layers at max_batch
    share: float = 0.0  # fraction of all tokens that pass through it (from the LP flow, or logged routes)
    layers_run: float | None = None  # mean layers run per visit; None: all of its layers (`with_routes` sets it)
    iteration_cap: float | None = None  # vLLM's most decode sequences in one iteration (caps file), if known

    @property
    def layers_per_visit(self) -> float:
        return self.layers[1] - self.layers[0] if self.layers_run is None else self.layers_run


@dataclass(frozen=True)
class ServingPrediction:
    tokens_per_s: float
    bound: str  # "capacity", "in-flight" (KV feeding), "launched" (fixed host count) or "kv-room"
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
    cap = float(decode_caps[k]) if decode_caps and k in decode_caps else None
    if cap is not None:
        max_batch = min(max_batch, cap)
    per_token_s = _layer_s(device, spec, "decode", max_batch) / max_batch + _prompt_s_per_token(device, spec)
    return DeviceLoad(device.name, layers, kv_tokens, max_batch, 1.0 / per_token_s, iteration_cap=cap)


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


def placement_loads(inventory: Inventory, spec: ModelSpec, placement: Placement, budgets: dict[str, float],
                    decode_caps: dict[str, dict[int, int]] | None = None,
                    physical: dict[str, float] | None = None) -> tuple[list[DeviceLoad], float]:
    """Each device's load (with its LP route share) and the capacity bound of the placement."""
    loads = []
    for name, layers in placement.items():
        device = inventory.device(name)
        if device.model not in budgets:
            raise PlanError(f"no KV budget for machine type {device.model!r}")
        loads.append(device_load(device, spec, layers, budgets[device.model], (decode_caps or {}).get(device.model),
                                 (physical or {}).get(device.model)))
    capacity, shares = capacity_bound(loads, spec.num_layers)
    return [replace(d, share=s) for d, s in zip(loads, shares)], capacity


def convoy_groups(loads: list[DeviceLoad], in_flight: float) -> list[float]:
    """The groups the requests in flight travel in, as fractions of them. A stage that cannot take the
    whole convoy in one vLLM iteration (its per-iteration cap) runs the cap first and the rest after,
    and the parts then travel on separately (stages are busy a small part of the time, so they seldom
    meet again): groups of the largest size every stage admits, and the remainder."""
    sizes = [d.iteration_cap / d.share for d in loads if d.share > 0 and d.iteration_cap]
    group = min(sizes, default=math.inf)
    if in_flight <= group:
        return [1.0]
    full, rest = divmod(in_flight, group)
    return [group / in_flight] * int(full) + ([rest / in_flight] if rest > 1e-9 else [])


def round_trip_terms(inventory: Inventory, spec: ModelSpec, loads: list[DeviceLoad], in_flight: float,
                     tokens_per_s: float) -> tuple[float, float, float]:
    """(profiled s, layer-iterations, request-iterations) of one token's trip: R = the first
    + Overhead.per_layer_s * the second + Overhead.per_request_s * the third."""
    profiled_s, layer_iters, request_iters = HOP_S, 0.0, 0.0
    groups = convoy_groups(loads, in_flight)
    for d in loads:
        if d.share <= 0:
            continue
        device, k = inventory.device(d.name), d.layers_per_visit
        batches = [max(f * in_flight * d.share, 1.0) for f in groups]  # a request's iteration, by its group
        layer_s = sum(f * _layer_s(device, spec, "decode", b) for f, b in zip(groups, batches))
        stretch = 1 / (1 - min(tokens_per_s * d.share * k * _prompt_s_per_token(device, spec), 0.9))
        profiled_s += d.share * (k * layer_s * stretch + HOP_S)
        layer_iters += d.share * k * stretch
        request_iters += d.share * sum(f * b for f, b in zip(groups, batches)) * stretch
    return profiled_s, layer_iters, request_iters


Route = tuple[tuple[str, int, int], ...]  # (device, first layer, stop layer) per stage, host excluded


def with_routes(loads: list[DeviceLoad], routes: dict[Route, float]) -> list[DeviceLoad]:
    """`loads` routed as logged: `routes` maps each route to its share of the generated tokens (summing to
    1). A device's share is the tokens that visit it; `layers_run` the layers a visit runs, on average
    (a route may use part of a device's range where ranges overlap)."""
    total = sum(routes.values())
    if total <= 0:
        raise PlanError("routes carry no tokens")
    names = {d.name for d in loads}
    visits: dict[str, list[float]] = {}
    for route, weight in routes.items():
        for name, a, b in route:
            if name not in names:
                raise PlanError(f"route visits {name!r}, which the placement does not hold")
            v = visits.setdefault(name, [0.0, 0.0])
            v[0] += weight / total
            v[1] += weight / total * (b - a)
    return [replace(d, share=visits[d.name][0], layers_run=visits[d.name][1] / visits[d.name][0])
            if d.name in visits else replace(d, share=0.0, layers_run=None) for d in loads]


def requests_in_flight(spec: ModelSpec, loads: list[DeviceLoad], host: Host) -> tuple[float, str]:
    """N and what sets it: the max-flow host's KV feeding rule, or a fixed host's count capped by KV room."""
    kv_per_layer = np.zeros(spec.num_layers)
    for d in loads:
        kv_per_layer[d.layers[0]:d.layers[1]] += d.kv_tokens
    room = kv_per_layer.min() / (PROMPT_TOKENS + OUTPUT_TOKENS)
    if host.launch is None:  # a pipeline that runs at all holds at least one request
        return max(FEED_HWM * room, 1.0), "in-flight"
    if host.launch <= room:
        return float(host.launch), "launched"
    return max(room, 1.0), "kv-room"


def in_flight_bound(inventory: Inventory, spec: ModelSpec, loads: list[DeviceLoad], overhead: Overhead,
                    in_flight: float) -> tuple[float, float]:
    """(tokens/s, token round trip s) with `in_flight` requests in the cluster."""
    tokens_per_s, round_trip_s = 0.0, 0.0
    for _ in range(100):  # fixed point: the prompt share of each stage grows with throughput
        profiled_s, layer_iters, request_iters = round_trip_terms(inventory, spec, loads, in_flight, tokens_per_s)
        round_trip_s = (profiled_s + overhead.per_layer_s * layer_iters + overhead.per_request_s * request_iters
                        + overhead.host_per_request_s * in_flight)
        previous, tokens_per_s = tokens_per_s, 0.5 * tokens_per_s + 0.5 * in_flight / round_trip_s
        if abs(tokens_per_s - previous) <= 1e-6 * tokens_per_s:
            break
    return tokens_per_s, round_trip_s


def _busy_per_token(d: DeviceLoad) -> float:
    """Seconds of `d`'s time per generated token of the cluster (at its largest batch)."""
    return d.share * d.layers_per_visit / max(d.tokens_per_s, 1e-9)


def routed_loads(inventory: Inventory, spec: ModelSpec, placement: Placement, budgets: dict[str, float],
                 decode_caps: dict[str, dict[int, int]] | None = None, physical: dict[str, float] | None = None,
                 routes: dict[Route, float] | None = None) -> tuple[list[DeviceLoad], float]:
    """`placement_loads`, routed by `routes` where given: the capacity is then the tokens/s at which the
    busiest device of those routes is fully busy, not the LP's best."""
    loads, capacity = placement_loads(inventory, spec, placement, budgets, decode_caps, physical)
    if routes is None or capacity <= 0:
        return loads, capacity
    loads = with_routes(loads, routes)
    return loads, 1.0 / max(_busy_per_token(d) for d in loads)


def predict_throughput(inventory: Inventory, spec: ModelSpec, placement: Placement, budgets: dict[str, float],
                       overhead: Overhead, decode_caps: dict[str, dict[int, int]] | None = None,
                       physical: dict[str, float] | None = None, host: Host = MAXFLOW,
                       routes: dict[Route, float] | None = None) -> ServingPrediction:
    """Offline decode tokens/s of `placement` (device name -> [first, stop) layers).

    `budgets`: machine type (DeviceProfile.model) -> bytes for weights + KV (`kv_caps.kv_budgets`);
    `decode_caps`: machine type -> {layers: vLLM's max decode batch}, optional;
    `physical`: machine type -> physical weights + KV bound, used beyond the profiled layer counts;
    `host`: the host loop that keeps requests in the cluster;
    `routes`: the routes requests took and their token shares, where the run logged them (else the LP's flow).
    """
    loads, capacity = routed_loads(inventory, spec, placement, budgets, decode_caps, physical, routes)
    if capacity <= 0:
        return ServingPrediction(0.0, "capacity", tuple(loads), min(loads, key=lambda d: d.max_batch).name, 0.0, 0.0)
    in_flight, bound = requests_in_flight(spec, loads, host)
    flight, round_trip_s = in_flight_bound(inventory, spec, loads, overhead, in_flight)
    if capacity <= flight:
        busy = max(loads, key=lambda d: _busy_per_token(d))
        return ServingPrediction(capacity, "capacity", tuple(loads), busy.name, in_flight, round_trip_s)
    # The layer with the least KV limits how many requests are admitted (or, with a fixed count, the host does).
    tightest = "host" if bound == "launched" else min(loads, key=lambda d: d.kv_tokens).name
    return ServingPrediction(flight, bound, tuple(loads), tightest, in_flight, round_trip_s)


@dataclass(frozen=True)
class MeasuredRun:
    """One measured prototype run: a placement of `spec` on an inventory, its decode tokens/s and mean
    decode latency (the token round trip), and the vLLM decode caps of its machine types."""
    inventory: Inventory
    spec: ModelSpec
    placement: Placement
    tokens_per_s: float
    round_trip_s: float
    decode_caps: dict[str, dict[int, int]] | None = None
    routes: dict[Route, float] | None = None


def fit_overhead(runs: list[MeasuredRun], budgets: dict[str, float], physical: dict[str, float]) -> Overhead:
    """The three overhead constants from measured runs.

    For each run, Little's law gives the requests in flight (tok/s * s/token), so no host model
    enters; the measured token round trip minus hops and the profiled decode time at each stage's
    batch is what the overheads must explain. Non-negative least squares on relative error.
    """
    if not runs:
        raise PlanError("fit_overhead needs at least one measured run")
    rows, rhs = [], []
    for run in runs:
        loads, _ = routed_loads(run.inventory, run.spec, run.placement, budgets, run.decode_caps, physical, run.routes)
        profiled_s, layer_iters, request_iters = round_trip_terms(
            run.inventory, run.spec, loads, run.tokens_per_s * run.round_trip_s, run.tokens_per_s)
        in_flight = run.tokens_per_s * run.round_trip_s
        rows.append([layer_iters / run.round_trip_s, request_iters / run.round_trip_s, in_flight / run.round_trip_s])
        rhs.append((run.round_trip_s - profiled_s) / run.round_trip_s)
    (per_layer_s, per_request_s, host_per_request_s), _ = nnls(np.array(rows), np.array(rhs))
    return Overhead(float(per_layer_s), float(per_request_s), float(host_per_request_s))
