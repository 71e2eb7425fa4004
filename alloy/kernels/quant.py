"""ctypes bindings for quant.c: integer-dot GEMV and dequantization on GGUF block formats.

quant.c is built once per instruction set, and the variant is chosen at run time from the CPU's
flags as the devices profile reports them (alloy.kernels.cpuinfo reads /proc/cpuinfo):
"avx512_vnni" (vpdpbusd) where the CPU has AVX-512 VNNI ("avx512_bf16": the same build with
AVX512_BF16 too, which the fused decode step's bf16 layers use), else "avx2" (vpmaddubsw + vpmaddwd)
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
_VNNI = (_BASE + ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-DALLOY_VNNI"),
         ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"))
ISA_FLAGS = {  # variant -> (compiler flags, CPU flags it needs), fastest first
    # the VNNI build plus AVX512_BF16: the fused decode step's bf16 layers on vdpbf16ps (gemv.c)
    "avx512_bf16": (_VNNI[0] + ("-mavx512bf16",), _VNNI[1] + ("avx512_bf16",)),
    "avx512_vnni": _VNNI,
    "avx2": (_BASE, ("avx2", "fma", "f16c")),
}
VNNI_ISAS = ("avx512_bf16", "avx512_vnni")  # the builds with vpdpbusd: the interleaved layouts' kernels
FORMAT_IDS = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q4_k": 3, "q4_0x8": 4, "q4_kx8": 5, "q8_0x8": 6}
# Layouts the kernels may hold instead of GGUF's (same bytes, rows interleaved): format -> (its
# interleaved name, the ISAs whose kernels read it, rows per group).
INTERLEAVED = {"q8_0": ("q8_0x8", VNNI_ISAS, 8), "q4_0": ("q4_0x8", VNNI_ISAS, 8), "q4_k": ("q4_kx8", VNNI_ISAS, 8)}


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


def distinct_isas() -> list[str]:
    """built_isas() less a build whose quant.c code another one in the list already is:
    "avx512_bf16" is "avx512_vnni"'s quant.c plus gemv.c's bf16 kernels (the tests of quant.c run these)."""
    built = built_isas()
    return [isa for isa in built if not (isa == "avx512_bf16" and "avx512_vnni" in built)]


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


def _x8_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Weights [groups, 8 rows, columns, 32] (0-15) -> [groups, columns, 128] in the x8 kernels' order."""
    q = q.reshape(*q.shape[:3], 4, 8)
    chunks = [q[..., 0, :] | (q[..., 1, :] << 4), q[..., 2, :] | (q[..., 3, :] << 4)]
    return torch.cat([c.permute(0, 2, 1, 3).reshape(c.shape[0], c.shape[2], 64) for c in chunks], dim=-1)


def _x8_weights(chunks: torch.Tensor) -> torch.Tensor:
    """The inverse: [groups, columns, 128] -> weights [groups, 8 rows, columns, 32]."""
    g, cols = chunks.shape[:2]
    c0, c1 = chunks[..., :64].reshape(g, cols, 8, 8), chunks[..., 64:].reshape(g, cols, 8, 8)
    q = torch.stack([c0 & 0x0F, c0 >> 4, c1 & 0x0F, c1 >> 4], dim=-2).reshape(g, cols, 8, 32)
    return q.permute(0, 2, 1, 3)


def repack_q4_0x8(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_0 rows uint8 [n, k / 32 * 18] (n a multiple of 8) -> the same bytes with 8 rows
    interleaved per block column, as quant.c's dots_q4_0x8 reads them: the 8 fp16 scales, then
    row r's weights 0-7 | 8-15 << 4 at bytes 8r.. of a 64-byte chunk, then 16-23 | 24-31 << 4."""
    n, row_bytes = blocks.shape
    nb = row_bytes // 18
    b = blocks.view(n // 8, 8, nb, 18)
    q = torch.cat([b[..., 2:] & 0x0F, b[..., 2:] >> 4], dim=-1)  # weights 0-31
    scales = b[..., :2].permute(0, 2, 1, 3).reshape(n // 8, nb, 16)
    return torch.cat([scales, _x8_nibbles(q)], dim=-1).reshape(n, row_bytes).contiguous()


def unpack_q4_0x8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of repack_q4_0x8: GGUF Q4_0 rows again (rows [8i, 8j) of a packed matrix)."""
    n, row_bytes = packed.shape
    nb = row_bytes // 18
    p = packed.reshape(n // 8, nb, 144)
    scales = p[..., :16].reshape(n // 8, nb, 8, 2).permute(0, 2, 1, 3)
    q = _x8_weights(p[..., 16:])  # [groups, 8 rows, nb, 32]
    qs = q[..., :16] | (q[..., 16:] << 4)
    return torch.cat([scales, qs], dim=-1).reshape(n, row_bytes).contiguous()


def q4_k_pack_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins per super-block -> ggml's 12 bytes (get_scale_min_k4's inverse)."""
    out = torch.zeros(ls.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out.to(torch.uint8)


def q4_k_unpack_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes per super-block -> (scales [B, 8], mins [B, 8]) as int32."""
    q = packed.to(torch.int32)
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def repack_q4_kx8(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_K rows uint8 [n, k / 256 * 144] (n a multiple of 8) -> the same bytes with 8 rows
    interleaved per super-block column, as quant.c's dots_q4_kx8 reads them."""
    n, row_bytes = blocks.shape
    ns = row_bytes // 144
    b = blocks.view(n // 8, 8, ns, 144)
    heads = [b[..., 0:2].permute(0, 2, 1, 3).reshape(n // 8, ns, 16), b[..., 2:4].permute(0, 2, 1, 3).reshape(n // 8, ns, 16)]
    sc, m = (t.view(n // 8, 8, ns, 8).permute(0, 2, 3, 1) for t in q4_k_unpack_scales(b[..., 4:16].reshape(-1, 12)))
    # sc, m: [groups, columns, sub-block, 8 rows] in 0-63
    low = [(t[..., :4] & 15) | ((t[..., 4:] & 15) << 4) for t in (sc, m)]  # 4 bytes each
    shifts = torch.arange(8, dtype=torch.int64) * 2
    high = (((sc.long() >> 4) & 3) << shifts).sum(-1) | ((((m.long() >> 4) & 3) << (shifts + 16)).sum(-1))
    high = high.to(torch.int32).unsqueeze(-1).contiguous().view(torch.uint8)  # little-endian, 4 bytes
    scales = torch.cat([low[0].to(torch.uint8), low[1].to(torch.uint8), high], dim=-1).reshape(n // 8, ns, 96)
    qs = b[..., 16:].reshape(n // 8, 8, ns, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=4).reshape(n // 8, 8, ns * 8, 32)  # sub-blocks in order
    nibbles = _x8_nibbles(q).reshape(n // 8, ns, 8 * 128)
    return torch.cat([*heads, scales, nibbles], dim=-1).reshape(n, row_bytes).contiguous()


def unpack_q4_kx8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of repack_q4_kx8: GGUF Q4_K rows again."""
    n, row_bytes = packed.shape
    ns = row_bytes // 144
    p = packed.reshape(n // 8, ns, 1152)
    d, dmin = (p[..., a:a + 16].reshape(n // 8, ns, 8, 2).permute(0, 2, 1, 3) for a in (0, 16))
    scales = p[..., 32:128].reshape(n // 8, ns, 8, 12).long()  # per sub-block: sc low, m low, high
    high = scales[..., 8:12].to(torch.uint8).contiguous().view(torch.int32).long()  # [g, ns, 8 sub, 1]
    shifts = torch.arange(8, dtype=torch.int64) * 2

    def six_bit(low_bytes, offset):
        low = torch.cat([low_bytes & 15, low_bytes >> 4], dim=-1)  # rows 0-3, 4-7
        return low | (((high >> (shifts + offset)) & 3) << 4)

    sc, m = six_bit(scales[..., 0:4], 0), six_bit(scales[..., 4:8], 16)  # [g, ns, 8 sub, 8 rows]
    sc, m = (t.permute(0, 3, 1, 2).reshape(-1, 8) for t in (sc, m))  # [(g, rows, ns), 8 sub]
    packed12 = q4_k_pack_scales(sc.int(), m.int()).view(n // 8, 8, ns, 12)
    q = _x8_weights(p[..., 128:].reshape(n // 8, ns * 8, 128)).reshape(n // 8, 8, ns, 4, 2, 32)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n // 8, 8, ns, 128)
    return torch.cat([d, dmin, packed12, qs.to(torch.uint8)], dim=-1).reshape(n, row_bytes).contiguous()


def repack_q8_0x8(blocks: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 rows uint8 [n, k / 32 * 34] (n a multiple of 8) -> 8 rows interleaved per block
    column: the 8 fp16 scales, then four 64-byte chunks, chunk j row r's weights 8j.. at bytes 8r..,
    each stored as w + 128 (as quant.c's dots_q8_0x8 reads them)."""
    n, row_bytes = blocks.shape
    nb = row_bytes // 34
    b = blocks.view(n // 8, 8, nb, 34)
    scales = b[..., :2].permute(0, 2, 1, 3).reshape(n // 8, nb, 16)
    q = (b[..., 2:] ^ 0x80).view(n // 8, 8, nb, 4, 8).permute(0, 2, 3, 1, 4).reshape(n // 8, nb, 256)
    return torch.cat([scales, q], dim=-1).reshape(n, row_bytes).contiguous()


def unpack_q8_0x8(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of repack_q8_0x8."""
    n, row_bytes = packed.shape
    nb = row_bytes // 34
    p = packed.reshape(n // 8, nb, 272)
    scales = p[..., :16].reshape(n // 8, nb, 8, 2).permute(0, 2, 1, 3)
    q = (p[..., 16:] ^ 0x80).reshape(n // 8, nb, 4, 8, 8).permute(0, 3, 1, 2, 4).reshape(n // 8, 8, nb, 32)
    return torch.cat([scales, q], dim=-1).reshape(n, row_bytes).contiguous()


REPACK = {"q4_0x8": (repack_q4_0x8, unpack_q4_0x8), "q4_kx8": (repack_q4_kx8, unpack_q4_kx8),
          "q8_0x8": (repack_q8_0x8, unpack_q8_0x8)}
