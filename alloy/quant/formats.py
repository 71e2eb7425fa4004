"""GGUF block formats Q8_0, Q4_0 and Q4_1: quantize fp32 rows to raw GGUF bytes and back.

A weight [out, in] becomes uint8 [out, in / 32 * type_size]: each row is a run of 32-weight
blocks in ggml's exact byte layout, so a tensor here is a GGUF tensor's data as is (and back).

    Q8_0 (34 bytes): fp16 d, int8 q[32]                     w = d * q
    Q4_0 (18 bytes): fp16 d, 16 bytes of nibbles            w = d * (q - 8)
    Q4_1 (20 bytes): fp16 d, fp16 m, 16 bytes of nibbles    w = d * q + m

Nibble byte i holds weight i in its low half and weight i + 16 in its high half. The rounding
follows ggml's reference quantizers (quantize_row_q*_ref) op for op in fp32, so the bytes equal
the `gguf` package's quantizer's (tests/test_quant_formats.py checks it); Q4_K is in q4_k.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK = 32


@dataclass(frozen=True)
class Format:
    name: str
    block_size: int  # weights per block
    type_size: int  # bytes per block
    ggml_type: int  # GGMLQuantizationType value, for GGUF files


FORMATS = {
    "q8_0": Format("q8_0", 32, 34, 8),
    "q4_0": Format("q4_0", 32, 18, 2),
    "q4_1": Format("q4_1", 32, 20, 3),
    "q4_k": Format("q4_k", 256, 144, 12),
}


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (halves away from zero), computed exactly as the gguf package does: floor(x + 0.5)
    would round 0.5 - 2^-25 up, because the sum itself rounds."""
    a = x.abs()
    floored = a.floor()
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] fp32 -> [..., 2] little-endian fp16 bytes."""
    return x.to(torch.float16).view(torch.uint8)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[blocks, 32] values 0..15 -> [blocks, 16] bytes: byte i = q[i] | q[i + 16] << 4."""
    q = q.to(torch.uint8)
    return q[:, :16] | (q[:, 16:] << 4)


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def quantize_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = blocks.abs().amax(dim=1, keepdim=True) / 127
    q = _round_away(blocks * _inverse(d)).to(torch.int8)
    return torch.cat([_fp16_bytes(d), q.view(torch.uint8)], dim=1)


def quantize_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # the scale's sign follows the largest-magnitude weight, which lands exactly on -8
    imax = blocks.abs().argmax(dim=1, keepdim=True)
    d = blocks.gather(1, imax) / -8
    q = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _pack_nibbles(q)], dim=1)


def quantize_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
    d = (hi - lo) / 15
    q = torch.trunc((blocks - lo) * _inverse(d) + 0.5).clamp(0, 15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(lo), _pack_nibbles(q)], dim=1)


def _fp16(raw: torch.Tensor) -> torch.Tensor:
    """[blocks, 2] bytes -> [blocks, 1] fp32."""
    return raw.contiguous().view(torch.float16).float()


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    return raw[:, 2:].contiguous().view(torch.int8).float() * _fp16(raw[:, :2])


def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    return _fp16(raw[:, :2]) * (_unpack_nibbles(raw[:, 2:]).float() - 8)


def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    return _fp16(raw[:, :2]) * _unpack_nibbles(raw[:, 4:]).float() + _fp16(raw[:, 2:4])
