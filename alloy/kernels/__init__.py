"""CPU decode GEMV kernels and a streaming-read probe (gemv.c), built on first use with the system C compiler, loaded with ctypes.

`load(source, flags)` builds and caches any kernel source here; quant.py uses it for quant.c
(GGUF block formats), once per instruction set.

Why a kernel of our own: a decode step is a chain of GEMVs, so its speed is how fast weights
stream from memory. On this class of CPU, PyTorch's fp32 GEMV (MKL) reads ~8-11 GB/s and its
bf16 one has no fast path on AVX2, while a plain AVX2 loop on two threads reads ~15-18 GB/s
(measured: docs/INFERENCE.md). The build is a ~1 s `cc` call cached under
$ALLOY_CACHE_DIR/kernels (default ~/.cache/alloy/kernels), keyed by the source and flags. Without a
compiler or AVX2+FMA, or with ALLOY_CPU_KERNELS=0, `available()` is False and callers fall back
to PyTorch ops: slower, same results. gemv.c is built once per instruction set (VARIANTS) and the
widest the CPU runs is taken.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from alloy.kernels.cpuinfo import cpu_flags  # the one reader of /proc/cpuinfo

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
# gemv.c's variants: flags and the CPU flags each needs, fastest first. The AVX-512 one (16 lanes,
# 2 weight rows x 8 activation rows per tile, prefetched) took a batch-8 fp32 step of the ~98M
# Llama from 27 to 16 ms of GEMV on the Xeon of docs/BENCHMARKS.md. "avx512_bf16" is the same build
# with bf16 weights multiplied by `vdpbf16ps` (gemv.c).
_AVX512 = (FLAGS + ("-mavx512f", "-mavx512bw", "-mavx512vl"), ("avx2", "fma", "avx512f", "avx512bw", "avx512vl"))
VARIANTS = {"avx512_bf16": (_AVX512[0] + ("-mavx512bf16",), _AVX512[1] + ("avx512_bf16",)),
            "avx512": _AVX512,
            "avx2": (FLAGS, ("avx2", "fma"))}
_FUNCTIONS = {torch.float32: "alloy_gemv_f32", torch.bfloat16: "alloy_gemv_bf16", torch.int8: "alloy_gemv_i8"}


def cache_dir() -> Path:
    return Path(os.environ.get("ALLOY_CACHE_DIR") or Path.home() / ".cache" / "alloy") / "kernels"


def measured_once(name: str, key: str, measure: Callable[[], dict]) -> dict:
    """`measure()`'s record for this machine: measured once per CPU, PyTorch and `key` (what else it
    depends on: thread count, a kernel source's bytes...), kept in the kernel cache as
    `name-<hash>.json` and written under a lock, so a job's ranks starting together measure once and
    take the same answer (where two paths round differently, they must). Without a writable cache,
    this process measures for itself."""
    from alloy.kernels.cpuinfo import cpuinfo

    info = cpuinfo()
    cpu = " ".join(info.get(field, "") for field in ("vendor_id", "model name", "cpu family", "model", "flags"))
    digest = hashlib.sha256(f"{cpu} {torch.__version__} {key}".encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "w")
    except OSError:
        return measure()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass
        record = {**measure(), "cpu": info.get("model name", "")}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, path)
        except OSError:
            pass
        return record


def best_of(call: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls, in seconds, after one warm-up call (buffers, pages):
    how measured_once's races time each contender."""
    call()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - started)
    return best


def _source_bytes(path: Path, seen: frozenset = frozenset()) -> bytes:
    """The source and, in order, every local file it #includes: a change to any rebuilds."""
    text = path.read_bytes()
    out = [text]
    for name in re.findall(rb'^#include "([^"]+)"', text, flags=re.M):
        dep = path.with_name(name.decode())
        if dep not in seen:
            out.append(_source_bytes(dep, seen | {path}))
    return b"".join(out)


def _build(compiler: str, source_path: Path = SOURCE, flags: tuple[str, ...] = FLAGS) -> Path:
    """Compile `source_path` with `flags` into the cache (once per source, compiler and flags)."""
    key = hashlib.sha256(_source_bytes(source_path) + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source_path.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: concurrent first uses (several ranks) never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(source_path), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def load(source_path: Path, flags: tuple[str, ...], what: str) -> ctypes.CDLL | None:
    """Build (cached) and load a kernel library; None, with a warning saying `what` is slower, if
    there is no compiler or the build fails."""
    cc = compiler()
    if cc is None:
        warnings.warn(f"no C compiler found: {what} uses PyTorch's slower ops", stacklevel=3)
        return None
    try:
        # Loaded after torch, so the OpenMP calls bind to the libgomp.so.1 torch already
        # loaded: one thread pool, not two spinning against each other.
        return ctypes.CDLL(str(_build(cc, source_path, flags)))
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", None) or err
        warnings.warn(f"building the CPU kernels for {what} failed ({str(detail).strip()[:200]}); "
                      "using PyTorch's slower ops", stacklevel=3)
        return None


def enabled() -> bool:
    """ALLOY_CPU_KERNELS=0 turns every compiled kernel off (PyTorch fallbacks everywhere)."""
    return os.environ.get("ALLOY_CPU_KERNELS", "1") != "0"


def runnable_variants() -> list[str]:
    """gemv.c's variants this CPU runs, fastest first (none without AVX2 + FMA or with ALLOY_CPU_KERNELS=0)."""
    if not enabled() or torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return []
    return [name for name, (_, needs) in VARIANTS.items() if set(needs) <= cpu_flags()]


def library(variant: str | None = None) -> ctypes.CDLL | None:
    """The built gemv.c: `variant` (a key of VARIANTS), or the fastest this CPU runs — chosen
    once, like every kernel here, so a model built with kernels keeps them."""
    if variant is None:
        return _default_library()
    return _library(variant) if variant in runnable_variants() else None


@functools.cache
def _default_library() -> ctypes.CDLL | None:
    # the first that builds: a compiler too old for a CPU's newest flags (-mavx512bf16) leaves the next
    return next((lib for lib in map(_library, runnable_variants()) if lib is not None), None)


@functools.cache
def _library(variant: str) -> ctypes.CDLL | None:
    lib = load(SOURCE, VARIANTS[variant][0], "decoding on CPU")
    if lib is None:
        return None
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
        fn.restype = None
    lib.alloy_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 2 + [ctypes.c_float]
    lib.alloy_rms_norm.restype = None
    lib.alloy_stream_read.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.alloy_stream_read.restype = ctypes.c_float
    return lib


def available() -> bool:
    return library() is not None


def gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
         bias: torch.Tensor | None = None, variant: str | None = None) -> torch.Tensor:
    """y = (x @ weight.T) * scale + bias for fp32 x [rows, in] and weight [out, in] in fp32, bf16 or int8.

    scale and bias are fp32 [out] or None. Every tensor must be contiguous on the CPU. `variant`:
    one of VARIANTS (tests run each); default the fastest this CPU runs.
    """
    lib = library(variant)
    rows, k = x.shape
    n = weight.shape[0]
    if lib is None or x.dtype != torch.float32 or weight.shape[1] != k:
        raise ValueError(f"gemv needs the compiled kernels, fp32 x [rows, {weight.shape[1]}]; got {x.dtype} {tuple(x.shape)}")
    y = torch.empty(rows, n, dtype=torch.float32)
    getattr(lib, _FUNCTIONS[weight.dtype])(
        x.data_ptr(), weight.data_ptr(), None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(), y.data_ptr(), rows, k, n, torch.get_num_threads())
    return y


def stream_read(x: torch.Tensor) -> float:
    """Read every element of a contiguous fp32 CPU tensor once (returns their sum)."""
    lib = library()
    if lib is None or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("stream_read needs the compiled kernels and a contiguous fp32 tensor")
    return float(lib.alloy_stream_read(x.data_ptr(), x.numel(), torch.get_num_threads()))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dim, for contiguous fp32 CPU x [rows, n]."""
    lib = library()
    if lib is None or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.shape[-1] != weight.shape[0]:
        raise ValueError("rms_norm needs the compiled kernels, fp32 x [rows, n] and an fp32 weight [n]")
    y = torch.empty_like(x)
    lib.alloy_rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y
