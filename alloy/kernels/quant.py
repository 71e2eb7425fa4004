"""ctypes bindings for quant.c: integer-dot GEMV and dequantization on GGUF block formats.

quant.c is built once per instruction set, and the variant is chosen at run time from the CPU's
flags as the devices profile reports them (alloy.kernels.cpuinfo reads /proc/cpuinfo):
"avx512_vnni" (vpdpbusd) where the CPU has AVX-512 VNNI, else "avx2" (vpmaddubsw + vpmaddwd)
where it has AVX2 + FMA + F16C, else none (callers dequantize and use PyTorch's matmul).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from alloy import kernels
from alloy.kernels.cpuinfo import cpu_flags  # the one reader of /proc/cpuinfo

SOURCE = Path(__file__).with_name("quant.c")
_BASE = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off")
ISA_FLAGS = {  # variant -> (compiler flags, CPU flags it needs)
    "avx512_vnni": (_BASE + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DALLOY_VNNI"),
                    ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")),
    "avx2": (_BASE, ("avx2", "fma", "f16c")),
}
FORMAT_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3}


def runnable_isas() -> list[str]:
    """Every variant this CPU can run, fastest first."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return []
    return [isa for isa, (_, needs) in ISA_FLAGS.items() if set(needs) <= cpu_flags()]


@functools.cache
def library(isa: str) -> ctypes.CDLL | None:
    lib = kernels.load(SOURCE, ISA_FLAGS[isa][0], "quantized matmuls")
    if lib is None:
        return None
    lib.alloy_qgemv.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
    lib.alloy_qgemv.restype = None
    lib.alloy_qdequant.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
                                   ctypes.c_int]
    lib.alloy_qdequant.restype = None
    lib.alloy_quantize_q4_k.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.alloy_quantize_q4_k.restype = None
    return lib


def built_isas() -> list[str]:
    """The variants this CPU runs and this machine could compile, fastest first."""
    return [isa for isa in runnable_isas() if library(isa) is not None]


def best_isa() -> str | None:
    """The variant to use here, None for the PyTorch fallback (also with ALLOY_CPU_KERNELS=0)."""
    if not kernels.enabled():
        return None
    return next(iter(built_isas()), None)


def _lib(isa: str | None) -> ctypes.CDLL:
    lib = None if isa is None else library(isa)
    if lib is None:
        raise ValueError(f"no compiled quantized kernels for ISA {isa!r} on this machine")
    return lib


def gemv(x: torch.Tensor, raw: torch.Tensor, fmt: str, out_features: int, bias: torch.Tensor | None,
         isa: str | None) -> torch.Tensor:
    """y = x @ W.T + bias for contiguous fp32 x [rows, in] and W as GGUF blocks uint8 [out, row_bytes]."""
    rows, k = x.shape
    if x.dtype != torch.float32 or not x.is_contiguous() or raw.dtype != torch.uint8 or raw.shape[0] != out_features:
        raise ValueError(f"qgemv needs contiguous fp32 x and uint8 blocks [{out_features}, ...]")
    y = torch.empty(rows, out_features, dtype=torch.float32)
    _lib(isa).alloy_qgemv(FORMAT_IDS[fmt], x.data_ptr(), raw.data_ptr(), None if bias is None else bias.data_ptr(),
                          y.data_ptr(), rows, k, out_features, torch.get_num_threads())
    return y


def dequantize(raw: torch.Tensor, fmt: str, in_features: int, isa: str | None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """GGUF blocks uint8 [out, row_bytes] -> fp32 [out, in], on OpenMP threads (into `out` if given:
    contiguous fp32 of that shape)."""
    if out is None:
        out = torch.empty(raw.shape[0], in_features, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != (raw.shape[0], in_features):
        raise ValueError(f"qdequant needs a contiguous fp32 out of [{raw.shape[0]}, {in_features}]")
    _lib(isa).alloy_qdequant(FORMAT_IDS[fmt], raw.data_ptr(), out.data_ptr(), raw.shape[0], in_features,
                             torch.get_num_threads())
    return out


def quantize_q4_k(rows: torch.Tensor, isa: str | None) -> torch.Tensor:
    """ggml's reference Q4_K quantizer in C: contiguous fp32 [..., 256 k] -> uint8 [superblocks, 144]."""
    superblocks = rows.numel() // 256
    out = torch.empty(superblocks, 144, dtype=torch.uint8)
    _lib(isa).alloy_quantize_q4_k(rows.data_ptr(), out.data_ptr(), superblocks, torch.get_num_threads())
    return out
