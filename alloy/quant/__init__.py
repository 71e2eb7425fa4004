"""GGUF block-quantized weights (Q8_0, Q4_0, Q4_1, Q4_K) kept quantized in memory.

`quantize(w [out, in])` -> uint8 [out, in / block_size * type_size], each row its blocks in GGUF's
byte layout; `dequantize` inverts it to the exact floats ggml would decode. `QuantLinear`
(alloy.quant.linear) runs a matmul on those bytes with the kernels of alloy.kernels.quant.
"""

from __future__ import annotations

import torch

from alloy.errors import ConfigError
from alloy.kernels import quant as kernel_quant
from alloy.quant import formats, q4_k
from alloy.quant.formats import FORMATS, Format

_QUANTIZE = {"q8_0": formats.quantize_q8_0, "q4_0": formats.quantize_q4_0, "q4_1": formats.quantize_q4_1,
             "q4_k": q4_k.quantize_q4_k}
_DEQUANTIZE = {"q8_0": formats.dequantize_q8_0, "q4_0": formats.dequantize_q4_0, "q4_1": formats.dequantize_q4_1,
               "q4_k": q4_k.dequantize_q4_k}
# Rows quantized per step: bounds the fp32 temporaries (Q4_K's search holds ~40 per weight).
# 256K weights: the reference quantizers' ~10 temporaries of a chunk stay ~10 MB, within the
# 1.3x-the-blocks bound on loading as Q4_0 (tests/test_quant_memory.py); the speed is the same.
CHUNK_WEIGHTS = 1 << 18

# The output matrix's (and token table's) format under every block format: llama.cpp keeps its
# output matrix at 6-8 bits too. Used by alloy.infer.optimize and the GGUF export alike.
HEAD_FORMAT = "q8_0"

__all__ = ["FORMATS", "Format", "HEAD_FORMAT", "quantize", "dequantize", "get_format"]


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ConfigError(f"unknown quantized format {name!r}; choose from {', '.join(FORMATS)}")
    return FORMATS[name]


def check_width(fmt: Format, in_features: int, what: str = "weight") -> None:
    if in_features % fmt.block_size:
        raise ConfigError(f"{what} has {in_features} inputs, not a multiple of {fmt.name}'s block of "
                          f"{fmt.block_size}; choose another --dtype")


@torch.no_grad()
def quantize(weight, name: str, *, layout: str | None = None) -> torch.Tensor:
    """fp32/bf16/fp16 [out, in] -> uint8 [out, in / block_size * type_size] on the CPU.

    `weight` is a tensor or anything with `shape`, `dim()` and row slices `weight[a:b]` giving
    tensors: a checkpoint's weight still on disk (alloy.checkpoint.io.StoredRows) is read
    CHUNK_WEIGHTS at a time, never whole. `layout`: a kernel layout of this format
    (alloy.kernels.quant.INTERLEAVED, e.g. "q4_0x8") to lay each chunk's rows out in as it is
    made, so the result is never repacked whole (a second copy, and its temporaries, of the blocks):
    the interleaving only regroups whole groups of rows, so the bytes equal repacking afterwards.
    Host work whatever the default device: under `with torch.device("cuda")` (as bench.gpu builds
    its models) the blocks and every temporary are still made on the CPU."""
    with torch.device("cpu"):
        return _quantize(weight, name, layout)


def _quantize(weight, name: str, layout: str | None) -> torch.Tensor:
    fmt = get_format(name)
    if weight.dim() != 2:
        raise ConfigError(f"quantize takes a 2-d weight [out, in], got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_width(fmt, in_features)
    group_rows, repack = 1, None
    if layout is not None and layout != name:
        _, _, group_rows = kernel_quant.INTERLEAVED[name]
        repack = kernel_quant.REPACK[layout][0]
        if out_features % group_rows:
            raise ConfigError(f"{layout} interleaves {group_rows} rows; the weight has {out_features}")
    row_bytes = in_features // fmt.block_size * fmt.type_size
    result = torch.empty(out_features, row_bytes, dtype=torch.uint8)
    step = max(1, CHUNK_WEIGHTS // in_features)
    step = max(group_rows, step // group_rows * group_rows)
    isa = kernel_quant.best_isa() if name == "q4_k" else None
    for start in range(0, out_features, step):
        rows = weight[start:start + step].detach().to("cpu", torch.float32)
        blocks = rows.reshape(-1, fmt.block_size)
        # Q4_K's search is ~40x faster in C (the same ops in the same order: same bytes)
        raw = kernel_quant.quantize_q4_k(blocks.contiguous(), isa) if isa else _QUANTIZE[name](blocks)
        del rows, blocks  # the chunk's floats, before the repack's temporaries
        raw = raw.view(-1, row_bytes)
        result[start:start + raw.shape[0]] = raw if repack is None else repack(raw)
    return result


def dequantize(raw: torch.Tensor, name: str) -> torch.Tensor:
    """uint8 [out, row_bytes] -> fp32 [out, in]."""
    fmt = get_format(name)
    if raw.dim() != 2 or raw.dtype != torch.uint8 or raw.shape[1] % fmt.type_size:
        raise ConfigError(f"{name} data must be uint8 [out, k * {fmt.type_size}], got {raw.dtype} {tuple(raw.shape)}")
    blocks = raw.reshape(-1, fmt.type_size)
    return _DEQUANTIZE[name](blocks).view(raw.shape[0], -1)
