"""Measure what the runtime pays beyond the layers' own work, on the workers themselves.

The planner's step time has a term for everything a training step costs (docs/PLANNER.md);
the layers' forward and backward are timed by the device profile (`layer_times`), the rest here,
by the same launcher, backend and CPU slices a real run uses:

- `links`: a send/recv between every pair of workers — latency (half a small round trip) and
  bandwidth (a 4 MiB message) — which pipeline hops pay twice per micro-batch;
- `allreduce`: one gloo all-reduce among all workers — latency of a one-element call and the ring
  bandwidth of an 8 MiB one — which the gradient buckets and the per-step scalars pay;
- `optimizer_s_per_param`: the update (gradient norm, fused AdamW) over the model's parameters
  (a block's, for a large model), per parameter;
- `micro_batch_overhead_s`: a pipeline schedule's fixed cost per micro-batch (a one-stage
  schedule over a tiny layer, 16 micro-batches against 1);
- `startup_s`: from launching the workers to their process group being ready.

`learn(inventory, [(plan, report), ...])` feeds runs back: one-stage replicas' measured compute against
the prediction rescales that device's layer times in the cached calibration (verify calls it
after its trials), so the next plan on the same devices starts closer.

Each figure is a mean over repetitions that span many CFS periods, so a quota slice's throttling
is in it; every message follows a burst of work, as in a real step, since a slice that sat idle
would send at full speed and time a faster device than the one a run gets. `calibrate(inventory)` returns the inventory with these filled in; it is cached under
$ALLOY_CACHE_DIR/calibration by the devices' identity. Run as `torchrun ... -m alloy.runtime.calibrate JOB`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import datetime, timedelta, timezone
from pathlib import Path

from alloy.devices import DeviceProfile, Inventory, Link, LinkSpec
from alloy.errors import AlloyError

SMALL_BYTES = 1024  # a message whose time is all latency
LARGE_BYTES = 4 * 1024**2  # a message whose time is mostly bandwidth
ALLREDUCE_BYTES = 8 * 1024**2
OPTIMIZER_WHOLE_MAX_PARAMS = 50_000_000
# Inference's ranks take turns: a message finds its receiver waiting, not working (the idle probe)
IDLE_PAUSE_S = 0.002
METHOD = 6  # bumped when what is measured changes: cached calibrations are then measured again


def runs_here(device: DeviceProfile) -> bool:
    """Devices this machine can start a worker on: its CPU (or a slice of it), its accelerators."""
    return device.measured and (device.kind == "cpu" or device.node == "local")


def cache_path(inventory: Inventory, names: list[str], spec=None) -> Path:
    devices = [inventory.device(n).model_dump(exclude={"free_memory_bytes", "layer_times", "measure_s",
                                                       "optimizer_s_per_param", "micro_batch_overhead_s"})
               for n in names]
    identity = json.dumps({"method": METHOD, "devices": devices, "spec": spec.to_dict() if spec else None},
                          sort_keys=True, default=str)
    return cache_path_for_key(hashlib.sha256(identity.encode()).hexdigest()[:16])


def calibrate(inventory: Inventory, *, spec=None, names: list[str] | None = None, refresh: bool = False,
              timeout_s: float = 300.0) -> Inventory:
    """The inventory with its runtime terms measured on workers in the devices' own slices.

    `names` picks the devices (default: every one that runs here); `spec` makes the optimizer
    probe use that model's block shapes. Declared devices that are not here keep their estimates.
    """
    names = names or [d.name for d in inventory.devices if runs_here(d)]
    if not names:
        raise CalibrationError("no device of this inventory runs here: nothing to calibrate "
                               "(declared clusters keep their estimated runtime terms)")
    path = cache_path(inventory, names, spec)
    if path.is_file() and not refresh:
        try:
            return apply(inventory, json.loads(path.read_text()), path.stem)
        except (ValueError, KeyError, TypeError):
            pass  # unreadable: measure again
    measured = measure(inventory, names, spec=spec, timeout_s=timeout_s)
    _write(path, measured)
    return apply(inventory, measured, path.stem)


def _write(path: Path, measured: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(measured, indent=1))
    tmp.replace(path)


# A measured/predicted ratio this far from 1 is a broken measurement, not a calibration.
SCALE_LIMITS = (0.1, 10.0)


def learn(inventory: Inventory, runs: list) -> dict[str, float]:
    """Feed a run back: each one-stage replica's measured forward+backward time (its step less its
    collectives and update; such a rank waits for nobody while it computes) against the plan's
    prediction for it rescales that device's layer times in the calibration, so the next plan on
    these devices predicts better. `runs` are (plan, report) pairs planned from `inventory`.

    Two scales per device: one for the set of devices that ran together (`compute_scale_by_set`:
    workers sharing a machine slow each other down — on two cores a slice alone ran a small
    model's step 1.7x faster than beside two others), used when a layout on exactly that set is
    priced again (`set_factors`); and the device's general scale (`compute_scale`), the median over
    this batch of runs, for sets not seen yet. Returns the general scale per device."""
    if inventory.calibration_key is None:
        return {}
    path = cache_path_for_key(inventory.calibration_key)
    try:
        measured = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    general = measured.setdefault("compute_scale", {})
    by_set = measured.setdefault("compute_scale_by_set", {})
    implied: dict[str, list[float]] = {}  # device -> the absolute scales the runs imply
    learned: dict[str, dict[str, list[float]]] = {}
    for plan, report in runs:
        by_rank = {info["rank"]: info for info in report.ranks}
        key = set_key(s.device for r in plan.replicas for s in r.stages)
        for replica in plan.replicas:
            if len(replica.stages) != 1 or replica.stages[0].predicted_busy_s <= 0:
                continue
            stage = replica.stages[0]
            ratio = report.rank_times(by_rank[stage.rank])["compute_s"] / stage.predicted_busy_s
            if SCALE_LIMITS[0] <= ratio <= SCALE_LIMITS[1]:
                # the scale its prediction was made with: the set's where it had one (verify prices so)
                used = by_set.get(key, {}).get(stage.device, general.get(stage.device, 1.0))
                implied.setdefault(stage.device, []).append(used * ratio)
                learned.setdefault(key, {}).setdefault(stage.device, []).append(used * ratio)
    for key, devices in learned.items():
        by_set.setdefault(key, {}).update({d: statistics.median(v) for d, v in devices.items()})
    for device, seen in implied.items():
        general[device] = statistics.median(seen)
    if implied:
        _write(path, measured)
    return dict(general)


def set_key(devices) -> str:
    return ",".join(sorted(set(devices)))


def set_factors(inventory: Inventory, devices) -> dict[str, float]:
    """For a layout on exactly `devices`: each device's scale learned on that set over the general
    one the inventory's layer times already carry ({} where the set has not run yet)."""
    if inventory.calibration_key is None:
        return {}
    try:
        measured = json.loads(cache_path_for_key(inventory.calibration_key).read_text())
    except (OSError, ValueError):
        return {}
    general = measured.get("compute_scale", {})
    scales = measured.get("compute_scale_by_set", {}).get(set_key(devices), {})
    return {d: v / general.get(d, 1.0) for d, v in scales.items()}


def scaled_inventory(inventory: Inventory, factors: dict[str, float]) -> Inventory:
    """The inventory with each named device's compute `factors[name]` times slower."""
    return inventory.model_copy(update={"devices": [_scaled(d, factors.get(d.name, 1.0)) for d in inventory.devices]})


def cache_path_for_key(key: str) -> Path:
    from alloy.devices.local import cache_dir

    return cache_dir().parent / "calibration" / f"{key}.json"


class CalibrationError(AlloyError):
    """Runtime terms that cannot be measured here."""


def measure(inventory: Inventory, names: list[str], *, spec=None, timeout_s: float = 300.0) -> dict:
    from alloy.runtime.launch import LaunchError, launch

    devices = {n: inventory.device(n).model_dump() for n in names}
    with tempfile.TemporaryDirectory(prefix="alloy-calibrate-") as out:
        job = {"order": names, "devices": devices, "spec": spec.to_dict() if spec else None, "out_dir": out,
               "timeout_s": min(120.0, timeout_s)}
        started = time.time()
        try:
            launch(job, len(names), timeout_s=timeout_s, worker_module="alloy.runtime.calibrate")
        except LaunchError as err:
            raise CalibrationError(f"calibrating {', '.join(names)} failed: {err}") from None
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(len(names))]
    result = {"names": names, "startup_s": max(r["ready_time"] for r in ranks) - started,
              "devices": {n: {"optimizer_s_per_param": r["optimizer_s_per_param"],
                              "micro_batch_overhead_s": r["micro_batch_overhead_s"]} for n, r in zip(names, ranks)},
              "links": ranks[0]["links"], "allreduce": ranks[0]["allreduce"],
              "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    return result


def apply(inventory: Inventory, measured: dict, key: str | None = None) -> Inventory:
    """Write measured runtime terms into an inventory (a plain copy; the input is left as it was),
    with the layer times of each device scaled by what runs on it have taught (`learn`)."""
    scales = measured.get("compute_scale", {})
    devices = [_scaled(d.model_copy(update=measured["devices"].get(d.name, {})), scales.get(d.name, 1.0))
               for d in inventory.devices]
    pairs = {frozenset((l["a"], l["b"])) for l in measured["links"]}
    links = [l for l in inventory.links if frozenset((l.a, l.b)) not in pairs] + [Link(**l) for l in measured["links"]]
    how = (f"runtime terms measured {measured['when']} on {len(measured['names'])} workers "
           f"(alloy.runtime.calibrate method {METHOD})")
    if scales:
        how += "; layer times rescaled by runs: " + ", ".join(f"{n} x{v:.2f}" for n, v in sorted(scales.items()))
    return inventory.model_copy(update={
        "devices": devices, "links": links,
        "allreduce": LinkSpec(**measured["allreduce"]) if measured["allreduce"] else inventory.allreduce,
        "startup_s": measured["startup_s"], "calibrated": how, "calibration_key": key})


def _scaled(device: DeviceProfile, scale: float) -> DeviceProfile:
    """The device with its compute `scale` times slower: its measured layer times where it has
    them for training, else its matmul rates (what the planner then prices the layers by)."""
    if scale == 1.0:
        return device
    if not any(t.phase == "train" for t in device.layer_times):
        return device.model_copy(update={"matmul_flops": {k: v / scale for k, v in device.matmul_flops.items()}})
    times = [t.model_copy(update={"layer_s": [v * scale for v in t.layer_s], "first_s": [v * scale for v in t.first_s],
                                  "last_s": [v * scale for v in t.last_s]}) if t.phase == "train" else t
             for t in device.layer_times]
    return device.model_copy(update={"layer_times": times})


# ---- the worker side ---------------------------------------------------------------------------

def _mean_s(fn, min_total_s: float, min_calls: int = 3) -> float:
    """Mean seconds per call over at least `min_total_s` (many CFS periods in a quota slice)."""
    fn()  # warm-up
    calls, started = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - started < min_total_s:
        fn()
        calls += 1
    return (time.perf_counter() - started) / calls


def _optimizer_probe(spec, device, window_s: float) -> float:
    import torch

    if spec is not None:
        from alloy.model import Transformer

        # The whole model where it is small enough (its per-tensor costs are the runtime's), else a block.
        whole = spec.num_params() <= OPTIMIZER_WHOLE_MAX_PARAMS
        middle = spec.num_layers // 2
        model = Transformer(spec) if whole else Transformer(spec, (middle, middle + 1), embed=False, head=False)
        params = list(model.to(device).parameters())
    else:
        params = [torch.nn.Parameter(torch.randn(512, 512, device=device)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type in ("cpu", "cuda") or None)
    count = sum(p.numel() for p in params)

    def update():  # as the runtime's update (alloy.runtime.engine): the gradient norm, then fused AdamW
        sum(torch.linalg.vector_norm(p.grad).double() ** 2 for p in params)
        optimizer.step()
    return _mean_s(update, window_s) / count


def _micro_batch_probe(rank: int, window_s: float) -> float:
    """A one-stage pipeline schedule over a tiny layer: the per-micro-batch cost is the schedule's own."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    layer = torch.nn.Linear(8, 8)
    group = None
    for r in range(dist.get_world_size()):  # new_group is collective: every rank makes every group
        made = dist.new_group([r])
        group = made if r == rank else group
    times = {}
    for m in (1, 16):
        stage = PipelineStage(layer, 0, 1, torch.device("cpu"), group=group)
        schedule = ScheduleGPipe(stage, m, loss_fn=lambda out, target: out.sum())
        x, target = torch.randn(m, 8), torch.zeros(m, 8)
        times[m] = _mean_s(lambda: schedule.step(x, target=target, losses=[]), window_s)
    return max(0.0, (times[16] - times[1]) / 15)


def _burst(seconds: float) -> None:
    """Busy work for `seconds` of wall time: it spends a quota slice's CPU time the way a backward
    pass does just before a message or a gradient sync (an idle slice would send at full speed)."""
    import torch

    a = torch.randn(64, 64)
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ a


def _ping_pong(rank: int, a: int, b: int, nbytes: int, rounds: int, burst_s: float, pause_s: float = 0.0) -> float:
    """Mean one-way seconds of an `nbytes` message between ranks a and b, each round trip after a
    burst of work on both (training: a backward, then a send), or after rank a pauses while b waits
    in its recv (`pause_s`: inference, where stages and expert ranks take turns)."""
    import torch
    import torch.distributed as dist

    buffer = torch.zeros(nbytes // 4)
    peer = b if rank == a else a
    total_s = 0.0
    for round_index in range(rounds + 1):
        _burst(burst_s)
        if pause_s and rank == a:
            time.sleep(pause_s)
        started = time.perf_counter()
        if rank == a:
            dist.send(buffer, peer)
            dist.recv(buffer, peer)
        else:
            dist.recv(buffer, peer)
            dist.send(buffer, peer)
        if round_index:  # the first is warm-up: the connection
            total_s += time.perf_counter() - started
    return total_s / (2 * rounds)


def _links(rank: int, names: list[str], burst_s: float) -> list[dict]:
    """Every pair's link, measured one pair at a time while the others wait (rank a records it)."""
    import torch.distributed as dist

    links = []
    for a, b in itertools.combinations(range(len(names)), 2):
        dist.barrier()
        if rank in (a, b):
            time.sleep(2 * IDLE_PAUSE_S)  # a quota slice starts the idle probe with its quota refilled
            idle_s = _ping_pong(rank, a, b, SMALL_BYTES, 20, 0.0, IDLE_PAUSE_S)
            latency_s = _ping_pong(rank, a, b, SMALL_BYTES, 20, burst_s)
            large_s = _ping_pong(rank, a, b, LARGE_BYTES, 4, burst_s)
            if rank == a:
                # a throttled slice can time the small message slower than the large one: then the
                # bandwidth is read from the large message alone (at most 2x off, never infinite)
                links.append({"a": names[a], "b": names[b], "latency_s": latency_s, "idle_latency_s": idle_s,
                              "bandwidth_bytes_per_s": LARGE_BYTES / max(large_s - latency_s, large_s / 2)})
    gathered: list = [None] * len(names)
    dist.all_gather_object(gathered, links)
    return [link for part in gathered for link in part]


def _allreduce(world: int, burst_s: float) -> dict | None:
    """One all-reduce call's latency and ring bandwidth, each call after a burst of work. A rank
    that arrives early waits for the others inside the call, so the rank that waited least (the
    smallest mean) times the collective itself."""
    import torch
    import torch.distributed as dist

    def mean_call_s(numel: int, calls: int) -> float:
        tensor = torch.ones(numel)
        dist.all_reduce(tensor)  # warm-up: buffers
        total_s = 0.0
        for _ in range(calls):
            _burst(burst_s)
            started = time.perf_counter()
            dist.all_reduce(tensor)
            total_s += time.perf_counter() - started
        means = [None] * world
        dist.all_gather_object(means, total_s / calls)
        return min(means)

    if world < 2:
        return None  # one worker: no collective to time
    latency_s = mean_call_s(1, 20)
    large_s = mean_call_s(ALLREDUCE_BYTES // 4, 4)
    # Ring all-reduce moves 2 (n - 1) / n of the bytes through each worker's link.
    ring_bytes = 2 * (world - 1) / world * ALLREDUCE_BYTES
    return {"latency_s": latency_s, "bandwidth_bytes_per_s": ring_bytes / max(large_s - latency_s, large_s / 2)}


def run_worker(job: dict) -> None:
    import torch.distributed as dist

    from alloy.devices import torch_device
    from alloy.devices.emulate import slice_period_us
    from alloy.runtime.launch import init_gloo
    from alloy.runtime.worker import _set_threads, _slice_context
    from alloy.spec import ModelSpec

    rank, names = int(os.environ["RANK"]), job["order"]
    profile = DeviceProfile.model_validate(job["devices"][names[rank]])
    spec = ModelSpec.from_dict(job["spec"]) if job.get("spec") else None
    _set_threads(None, profile)  # calibration probes: the node's cores shared among its ranks
    # Windows of 20 CFS periods, so a quota slice's throttling is inside every mean.
    window_s = 0.2 if profile.cpu_slice is None else max(0.2, 20 * slice_period_us(profile.cpu_slice) / 1e6)
    with ExitStack() as stack:
        stack.enter_context(_slice_context(profile))
        init_gloo(timeout=timedelta(seconds=float(job["timeout_s"])))
        stack.callback(dist.destroy_process_group)
        dist.barrier()
        ready = time.time()
        record = {"rank": rank, "ready_time": ready,
                  "optimizer_s_per_param": _optimizer_probe(spec, torch_device(profile.name, profile.kind), window_s),
                  "micro_batch_overhead_s": _micro_batch_probe(rank, window_s)}
        burst_s = 3 * window_s / 20  # three CFS periods of work before each message
        record["links"] = _links(rank, names, burst_s)
        dist.barrier()
        record["allreduce"] = _allreduce(len(names), burst_s)
        Path(job["out_dir"], f"rank{rank}.json").write_text(json.dumps(record))
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    from alloy.runtime.launch import worker_main

    return worker_main(run_worker, argv)


if __name__ == "__main__":
    sys.exit(main())
