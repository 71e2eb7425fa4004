"""This device's measured rates: the denominators that MFU and roofline fractions are taken against."""

from __future__ import annotations

import statistics
import time

import torch

from bench.gpu.common import sync


def _median_s(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    samples_s = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        samples_s.append(time.perf_counter() - start)
    return statistics.median(samples_s)


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype, n: int, reps: int = 10) -> float:
    """An n x n x n matmul on random data (zeros run faster on Hopper and would flatter MFU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _median_s(lambda: torch.matmul(a, b), device, warmup=3, reps=reps)
    return 2 * n**3 / seconds


def copy_bytes_per_s(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy rate, bytes read plus bytes written (what a GEMV streams is reads)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = _median_s(lambda: dst.copy_(src), device, warmup=3, reps=reps)
    return 2 * nbytes / seconds
