"""Measure one device: sustained matmul FLOP/s per dtype, memory and host-link bandwidth.

Every figure is a median over short repetitions after a warm-up, so a neighbour's burst on a
shared machine moves it little. Each device gets a time budget; the rates that matter most
(matmul) get most of it.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from alloy.devices.discovery import FoundDevice
from alloy.devices.schema import DeviceProfile
from alloy.errors import AlloyError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (tokens M, in-features K, out-features N) of a layer's GEMMs: a square one and an MLP up-projection.
GEMM_SHAPES = {
    "cpu": [(1024, 1024, 1024), (512, 1024, 4096)],
    "accelerator": [(4096, 4096, 4096), (4096, 4096, 14336)],
}
PROBE_SIZE = {"cpu": 256, "accelerator": 2048}  # square matmul that tells a fast path from a slow one
# A half-precision dtype slower than this fraction of fp32 has no fast path: a plan would never
# choose it for speed, and timing it properly would take minutes (fp16 on most CPUs: ~1/50 of fp32).
SLOW_FRACTION_OF_FP32 = 0.5
COPY_BYTES = {"cpu": 128 << 20, "accelerator": 512 << 20}  # larger than any last-level cache
HOST_LINK_BYTES = 256 << 20
DEFAULT_BUDGET_S = {"cpu": 4.0, "accelerator": 3.0}
# Shortest timed repetition. Inside a CPU quota slice it is raised to many CFS periods
# (`time_repetitions_over`): a call shorter than the slice's quota runs at full speed and the
# throttling falls between samples, so a median of short calls would time the core, not the slice.
_min_rep_s = 2e-3


def time_repetitions_over(seconds: float) -> None:
    """Make every timed repetition in this process last at least `seconds` (a throughput, not a burst)."""
    global _min_rep_s
    _min_rep_s = max(2e-3, seconds)


class DeviceError(AlloyError):
    """A device that cannot be measured (missing, out of memory, or an operation it lacks)."""


def _family(kind: str) -> str:
    return "cpu" if kind == "cpu" else "accelerator"


def synchronize(device: torch.device) -> None:
    """Wait for queued work: accelerator kernels run asynchronously to the host."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, budget_s: float,
              min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds per call of `fn`, after one warm-up call, within about `budget_s`.

    `min_reps` gives way to a hard cap of twice the budget, so a device far slower than expected
    (or a machine suddenly busy) costs seconds, not minutes.
    """
    fn()  # warm-up: first-touch page faults, kernel selection, thread-pool start
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    one_call_s = time.perf_counter() - start
    # Short calls are batched so each timed repetition is long enough for the clock and the sync
    # (and, in a quota slice, spans enough CFS periods to include its throttling).
    calls_per_rep = max(1, math.ceil(_min_rep_s / max(one_call_s, 1e-7)))
    samples_s: list[float] = []
    now = time.perf_counter()
    deadline, hard_stop = now + budget_s, now + 2 * budget_s
    while not samples_s or (now < hard_stop and len(samples_s) < min_reps) or (now < deadline and len(samples_s) < max_reps):
        rep_start = time.perf_counter()
        for _ in range(calls_per_rep):
            fn()
        synchronize(device)
        now = time.perf_counter()
        samples_s.append((now - rep_start) / calls_per_rep)
    return statistics.median(samples_s)


def matmul_flops(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int]],
                 budget_s: float) -> float:
    """Sustained FLOP/s: the geometric mean over `shapes` of each shape's median rate."""
    rates = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        seconds = time_call(lambda: torch.matmul(a, b), device, budget_s / len(shapes))
        rates.append(2 * m * k * n / seconds)
    return math.exp(sum(math.log(r) for r in rates) / len(rates))


def slow_reason(device: torch.device, dtype: str, size: int, isa_flags: tuple[str, ...],
                rounds: int = 5) -> str | None:
    """Why `dtype` should not be timed on this device, from a short probe against fp32; None if fast.

    The two dtypes take turns and each keeps its best time: a neighbour's burst only ever slows a
    call down, so best-of-interleaved compares the two at the same moments and at full speed.
    On a CPU the probe runs one thread: a fast path is a per-core property, and a small
    multi-threaded matmul on a busy machine mostly measures threads waiting for each other.
    """
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _probe(device, dtype, size, isa_flags, rounds)
        finally:
            torch.set_num_threads(threads)
    return _probe(device, dtype, size, isa_flags, rounds)


def _probe(device: torch.device, dtype: str, size: int, isa_flags: tuple[str, ...], rounds: int) -> str | None:
    operands = {}
    try:
        for name in ("fp32", dtype):
            a = torch.randn(size, size, device=device).to(TORCH_DTYPES[name])
            operands[name] = (a, a.clone())
            torch.matmul(*operands[name])  # warm-up, and the test that kernels exist at all
    except RuntimeError as err:  # e.g. a backend without kernels for this dtype
        return f"matmul not supported: {str(err).splitlines()[0]}"
    best_s = {name: math.inf for name in operands}
    for _ in range(rounds):
        for name, (a, b) in operands.items():
            synchronize(device)
            start = time.perf_counter()
            torch.matmul(a, b)
            synchronize(device)
            best_s[name] = min(best_s[name], time.perf_counter() - start)
    rates = {name: 2 * size**3 / seconds for name, seconds in best_s.items()}
    if rates[dtype] >= SLOW_FRACTION_OF_FP32 * rates["fp32"]:
        return None
    reason = (f"no fast path: {rates[dtype] / 1e9:.1f} vs fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s "
              f"in a {size}^3 probe")
    if device.type == "cpu":
        wanted = {"bf16": ("avx512_bf16", "amx_bf16", "bf16"), "fp16": ("avx512_fp16", "amx_fp16", "asimdhp")}[dtype]
        if not set(wanted) & set(isa_flags):
            reason += f" (CPU lacks {'/'.join(wanted)})"
    return reason


def memory_bandwidth_bytes_per_s(device: torch.device, nbytes: int, budget_s: float) -> float:
    """Memory streaming rate. On a CPU: the read rate of a vectorised sum on every thread (what a
    decode step's weight streaming can reach; a copy's write-allocate traffic would understate it
    by ~2x), PyTorch's sum where Alloy's kernels are not built. On a GPU: STREAM-style copy, bytes
    read plus bytes written, per second."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    if device.type == "cpu":
        from alloy import kernels

        read = (lambda: kernels.stream_read(src)) if kernels.available() else src.sum
        return nbytes / time_call(read, device, budget_s)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, budget_s)
    return 2 * nbytes / seconds


def host_link_bytes_per_s(device: torch.device, nbytes: int, budget_s: float) -> float:
    """Host <-> device copy rate: the slower of the two directions (pinned host memory)."""
    pin = device.type == "cuda"
    host = torch.ones(nbytes // 4, dtype=torch.float32, pin_memory=pin)
    on_device = torch.empty_like(host, device=device)
    to_device_s = time_call(lambda: on_device.copy_(host, non_blocking=pin), device, budget_s / 2)
    to_host_s = time_call(lambda: host.copy_(on_device, non_blocking=pin), device, budget_s / 2)
    return nbytes / max(to_device_s, to_host_s)


def measure(found: FoundDevice, budget_s: float | None = None) -> DeviceProfile:
    """Time `found` within about `budget_s` seconds and return its measured profile."""
    family = _family(found.kind)
    budget_s = DEFAULT_BUDGET_S[family] if budget_s is None else budget_s
    device = torch.device(found.name)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            slow = {}
            for dtype in ("bf16", "fp16"):
                reason = slow_reason(device, dtype, PROBE_SIZE[family], found.isa_flags)
                if reason:
                    slow[dtype] = reason
            fast = [d for d in TORCH_DTYPES if d not in slow]
            # Matmul rates get 80% of the budget, the copies the rest.
            flops = {d: matmul_flops(device, TORCH_DTYPES[d], GEMM_SHAPES[family], 0.8 * budget_s / len(fast))
                     for d in fast}
            copy_bytes = _fit(COPY_BYTES[family], found.free_memory_bytes, parts=4)
            bandwidth = memory_bandwidth_bytes_per_s(device, copy_bytes, 0.1 * budget_s)
            host_link = None if family == "cpu" else host_link_bytes_per_s(
                device, _fit(HOST_LINK_BYTES, found.free_memory_bytes, parts=2), 0.1 * budget_s)
    except torch.OutOfMemoryError:
        raise DeviceError(f"{found.name}: out of memory while measuring; free some memory and retry") from None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return DeviceProfile(
        name=found.name, kind=found.kind, model=found.model,
        memory_bytes=found.memory_bytes, free_memory_bytes=found.free_memory_bytes,
        matmul_flops=flops, slow_dtypes=slow, memory_bandwidth_bytes_per_s=bandwidth,
        host_link_bytes_per_s=host_link, threads=torch.get_num_threads() if family == "cpu" else None,
        isa_flags=list(found.isa_flags), compute_capability=found.compute_capability,
        measured=True, measure_s=round(time.perf_counter() - start, 3),
    )


def _fit(nbytes: int, free_bytes: int | None, parts: int) -> int:
    """`nbytes`, shrunk so that `parts` buffers of it fit in a quarter of free memory."""
    if free_bytes is None:
        return nbytes
    return max(1 << 20, min(nbytes, free_bytes // (4 * parts)))
