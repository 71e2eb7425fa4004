"""The C dequantizers (alloy/kernels/quant.c: alloy_qdequant, every layout each built ISA reads)
against the `gguf` package's, bit for bit, on arbitrary block bytes: random nibbles and int8s
everywhere, and fp16 scales and mins drawn to hit zero, -0, subnormals, tiny, huge and negative
values (ggml's roundings, signed zeros included). The prefill's GEMM tiles are these floats;
then QuantLinear's tile loop itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from alloy import quant  # noqa: E402
from alloy.kernels import quant as kernel_quant  # noqa: E402
from alloy.quant.linear import QuantLinear  # noqa: E402

GGML = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q4_k": T.Q4_K}
# byte offsets of each format's fp16 fields in a block: scales (and Q4_1's min, Q4_K's dmin)
FP16_FIELDS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q4_k": (0, 2)}
# (format, layout the C dequantizer reads) for every layout of every format
LAYOUTS = [(fmt, fmt) for fmt in quant.FORMATS] + [(fmt, spec[0]) for fmt, spec in kernel_quant.INTERLEAVED.items()]
ISAS = kernel_quant.distinct_isas()


def _fp16(g: torch.Generator, count: int) -> torch.Tensor:
    """Finite fp16 values of every kind: normal of varied size and sign, zeros of both signs,
    subnormals, the largest finite. (No inf / NaN: a GGUF file's scales are finite.)"""
    mags = torch.exp2(torch.randint(-14, 16, (count,), generator=g).float()) * (1 + torch.rand(count, generator=g))
    values = mags * torch.where(torch.rand(count, generator=g) < 0.5, -1.0, 1.0)
    kind = torch.randint(0, 12, (count,), generator=g)
    values = torch.where(kind == 0, torch.zeros(count), values)
    values = torch.where(kind == 1, torch.full((count,), -0.0), values)
    values = torch.where(kind == 2, torch.randint(1, 1024, (count,), generator=g).float() * 2.0**-24, values)
    values = torch.where(kind == 3, torch.full((count,), 65504.0), values)
    return values.to(torch.float16).view(torch.uint8).view(count, 2)


def _blocks(fmt: str, rows: int, blocks: int, seed: int) -> torch.Tensor:
    """Arbitrary GGUF bytes [rows, blocks * type_size] with finite fp16 fields."""
    spec = quant.FORMATS[fmt]
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (rows * blocks, spec.type_size), generator=g, dtype=torch.uint8)
    for offset in FP16_FIELDS[fmt]:
        raw[:, offset:offset + 2] = _fp16(g, rows * blocks)
    return raw.view(rows, blocks * spec.type_size)


def _assert_bits_equal(got: torch.Tensor, want: np.ndarray) -> None:
    got = got.numpy().view(np.uint32)
    want = want.reshape(got.shape).view(np.uint32)
    assert np.array_equal(got, want), f"{int((got != want).sum())} of {got.size} floats differ"


@pytest.mark.skipif(not ISAS, reason="no compiled quantized kernels on this machine")
@settings(max_examples=60, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), isa=st.sampled_from(ISAS or [None]), groups=st.integers(1, 4),
       blocks=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_c_dequantizer_equals_gguf_bit_for_bit(layout, isa, groups, blocks, seed):
    fmt, kernel_fmt = layout
    if kernel_fmt != fmt and isa not in kernel_quant.INTERLEAVED[fmt][1]:
        kernel_fmt = fmt  # this ISA has no kernel for the interleaved layout: GGUF's then
    rows = 8 * groups  # whole groups for the interleaved layouts (and any row count for GGUF's)
    raw = _blocks(fmt, rows, blocks, seed)
    k = blocks * quant.FORMATS[fmt].block_size
    held = raw if kernel_fmt == fmt else kernel_quant.REPACK[kernel_fmt][0](raw)
    want = gguf.quants.dequantize(raw.numpy(), GGML[fmt])
    _assert_bits_equal(kernel_quant.dequantize(held, kernel_fmt, k, isa), want)


@pytest.mark.parametrize("fmt, kernel_fmt, isa", [(fmt, kernel_fmt, isa) for isa in ISAS for fmt, kernel_fmt in LAYOUTS
                                                   if kernel_fmt == fmt or isa in kernel_quant.INTERLEAVED[fmt][1]])
def test_c_dequantizer_at_a_layer_size_on_two_threads(fmt, kernel_fmt, isa):
    # a prefill tile's size (rows split over the threads, many block columns) into a reused buffer;
    # each ISA with the layouts it has a kernel for
    raw = _blocks(fmt, 264, 2048 // quant.FORMATS[fmt].block_size, seed=7)
    held = raw if kernel_fmt == fmt else kernel_quant.REPACK[kernel_fmt][0](raw)
    out = torch.full((264, 2048), float("nan"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        kernel_quant.dequantize(held, kernel_fmt, 2048, isa, out=out)
    finally:
        torch.set_num_threads(threads)
    _assert_bits_equal(out, gguf.quants.dequantize(raw.numpy(), GGML[fmt]))


@pytest.mark.parametrize("rows", [33, 200, 600])
def test_prefill_tiles_write_every_column_of_the_product(rows, monkeypatch):
    # the GEMM path in several tiles (the last a partial one), each written into its columns of y
    monkeypatch.setenv("ALLOY_QUANT_KERNEL_ROWS", "32")  # the GEMM path, whatever this machine measured
    g = torch.Generator().manual_seed(rows)
    w, x = torch.randn(2056, 2048, generator=g), torch.randn(rows, 2048, generator=g)
    for fmt in ("q8_0", "q4_k"):
        layer = QuantLinear.from_weight(w, None, fmt)
        assert layer._tile_rows(rows) < layer.out_features
        w_exact = layer.dequantized().double()
        # fp32 rounding only: k + 8 roundings of terms below |x| . max|w_row| (the weights are exact)
        bound = (2048 + 8) * 2.0**-24 * x.abs().sum(1, keepdim=True).double() * w_exact.abs().amax(1)[None, :]
        want = x.double() @ w_exact.t()
        with torch.inference_mode():
            assert ((layer(x).double() - want).abs() <= bound).all(), fmt
        # a caller whose x autograd tracks (the GEMM's out= refuses it) gets the product too
        tracked = layer(x.clone().requires_grad_())
        assert tracked.requires_grad and ((tracked.detach().double() - want).abs() <= bound).all(), fmt
