"""GGUF Q4_K: super-blocks of 256 weights in 144 bytes, as ggml lays them out (block_q4_K).

    fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins (8 sub-blocks of 32), 128 bytes of nibbles
    sub-block j: w = d * sc[j] * q - dmin * m[j]

Bytes 32p..32p+31 of the nibbles hold sub-block 2p in their low halves and 2p + 1 in their high
halves. The quantizer is ggml's quantize_row_q4_K_ref (make_qkx2_quants: a 21-step search for
the scale and min of each sub-block by weighted least squares), vectorised over sub-blocks but
sequential over the 32 weights of each, in fp32 with one rounding per C operation, so its sums
round as the C loops do (compiled without FMA contraction; a ggml built with contraction may
differ in the last bit of a sum and, rarely, in a chosen scale). The `gguf` package has no Q4_K
quantizer to compare with, only the dequantizer: tests check the bytes decode to the same floats.
"""

from __future__ import annotations

import torch

# the 12-byte scale packing is shared with the kernels' interleaved layout (the lower layer keeps it)
from alloy.kernels.quant import q4_k_pack_scales as _pack_scales
from alloy.kernels.quant import q4_k_unpack_scales as unpack_scales

SUPER = 256
SUB = 32
NMAX = 15


def _nearest_int(x: torch.Tensor) -> torch.Tensor:
    # ggml's nearest_int adds 1.5 * 2^23 and reads the mantissa: round half to even, as torch.round
    return torch.round(x).to(torch.int32)


def _seq_sum(terms: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
    """Left-to-right fp32 sum over the last dim (C's `s += t` loop), not a pairwise reduction."""
    total = torch.zeros(terms.shape[:-1]) if start is None else start
    for i in range(terms.shape[-1]):
        total = total + terms[..., i]
    return total


def _weighted_sq_error(scale, lq, mn, x, w):
    diff = scale[:, None] * lq + mn[:, None] - x
    return _seq_sum(w * (diff * diff))


def make_qkx2_quants(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale [S], -min [S], levels [S, 32] int) for S sub-blocks x [S, 32] with weights w."""
    mn = first_min = x.amin(dim=1).clamp(max=0)
    mx = x.amax(dim=1)
    sum_w = _seq_sum(w[:, 1:], w[:, 0])
    sum_x = _seq_sum(w[:, 1:] * x[:, 1:], w[:, 0] * x[:, 0])
    flat = mx == mn
    span = torch.where(flat, torch.ones_like(mx), mx - mn)  # flat rows are overwritten at the end
    # tensor / tensor: torch computes `number / tensor` as reciprocal-then-multiply (two roundings)
    iscale = torch.full_like(span, NMAX) / span
    scale = 1 / iscale
    levels = _nearest_int(iscale[:, None] * (x - mn[:, None])).clamp(0, NMAX).float()
    best = _weighted_sq_error(scale, levels, mn, x, w)
    for step in range(21):  # rmin -1, rdelta 0.1, nstep 20
        shift = torch.tensor(-1.0) + torch.tensor(0.1) * torch.tensor(float(step)) + NMAX
        # C updates `min` when a step wins, so later steps' span and offset move with it
        span = torch.where(flat, torch.ones_like(mx), mx - mn)
        lq = _nearest_int((shift / span)[:, None] * (x - mn[:, None])).clamp(0, NMAX).float()
        wl = w * lq
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * lq), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = _weighted_sq_error(this_scale, lq, this_min, x, w)
        better = (det > 0) & (err < best)
        levels = torch.where(better[:, None], lq, levels)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat[:, None], torch.zeros_like(levels), levels)
    return scale, -torch.where(flat, first_min, mn), levels


def _six_bit(values: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    inverse = torch.where(top > 0, torch.full_like(top, 63) / top, torch.zeros_like(top))
    # C stores nearest_int in a uint8, then clamps to 63
    return (_nearest_int(inverse[:, None] * values) & 0xFF).clamp(max=63)


def quantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    """[B, 256] fp32 -> [B, 144] uint8."""
    n = blocks.shape[0]
    x = blocks.reshape(n * 8, SUB)
    # sqrtf is correctly rounded; torch's fp32 sqrt is not always (1 ulp off), a float64 sqrt rounded once is
    av_x = torch.sqrt((_seq_sum(x * x) / SUB).double()).float()
    scales, mins, levels = make_qkx2_quants(x, av_x[:, None] + x.abs())
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    # C starts from +0 and keeps it unless a value is > 0: a -0.0 min must not reach the bytes
    max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    packed = _pack_scales(_six_bit(scales, max_scale), _six_bit(mins, max_min))
    d16, dmin16 = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    sc, m = unpack_scales(packed)
    d = (d16.float()[:, None] * sc.float()).reshape(-1, 1)
    dm = (dmin16.float()[:, None] * m.float()).reshape(-1, 1)
    requantized = _nearest_int((x + dm) / torch.where(d == 0, torch.ones_like(d), d)).clamp(0, NMAX).float()
    levels = torch.where(d == 0, levels, requantized).to(torch.uint8).view(n, 4, 2, SUB)
    qs = (levels[:, :, 0] | (levels[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([d16[:, None].view(torch.uint8), dmin16[:, None].view(torch.uint8), packed, qs], dim=1)


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    """[B, 144] uint8 -> [B, 256] fp32, the same floats as ggml's dequantize_row_q4_K."""
    n = raw.shape[0]
    d = raw[:, 0:2].contiguous().view(torch.float16).float()
    dmin = raw[:, 2:4].contiguous().view(torch.float16).float()
    sc, m = unpack_scales(raw[:, 4:16])
    qs = raw[:, 16:].reshape(n, 4, 1, SUB)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, 8, SUB).float()
    return ((d * sc.float())[:, :, None] * q - (dmin * m.float())[:, :, None]).reshape(n, SUPER)
