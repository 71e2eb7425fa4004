"""GGUF block formats (alloy.quant): bytes equal the `gguf` package's reference quantizer, values
equal its dequantizer, and the bytes survive a GGUF file round trip.

The gguf package has no Q4_K quantizer, so Alloy's Q4_K bytes are checked two ways: the PyTorch
port and the C port of ggml's quantize_row_q4_K_ref (alloy/kernels/quant.c) agree byte for byte
(two independent transcriptions of one algorithm), and gguf's dequantizer reads them back.
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
from alloy.errors import ConfigError  # noqa: E402
from alloy.kernels import quant as kernel_quant  # noqa: E402
from alloy.quant import q4_k  # noqa: E402

GGML = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q4_k": T.Q4_K}


def _weights(seed: int, rows: int, cols: int, scale: float) -> torch.Tensor:
    """Random weights plus blocks that hit the formats' edge cases: all zero (scale 0), constant,
    all positive, all negative (largest magnitude negative), and an evenly spaced ramp."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * scale
    block = 32
    edits = [torch.zeros(block), torch.full((block,), 0.5 * scale), torch.rand(block, generator=g) * scale,
             -torch.rand(block, generator=g) * scale, torch.arange(block) * scale / 4 - 4 * scale]
    flat = w.view(-1, block)
    for i, values in enumerate(edits[:flat.shape[0]]):
        flat[(i * 7) % flat.shape[0]] = values
    return w


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["q8_0", "q4_0", "q4_1"]), rows=st.integers(1, 19), blocks=st.integers(1, 9),
       scale=st.sampled_from([1e-4, 0.02, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_bytes_equal_gguf_reference_quantizer(fmt, rows, blocks, scale, seed):
    w = _weights(seed, rows, 32 * blocks, scale)
    mine = quant.quantize(w, fmt)
    theirs = gguf.quants.quantize(w.numpy(), GGML[fmt])
    assert mine.shape == theirs.shape and mine.dtype == torch.uint8
    assert np.array_equal(mine.numpy(), theirs)
    ours_f32 = quant.dequantize(mine, fmt).numpy()
    assert np.array_equal(ours_f32.view(np.uint32), gguf.quants.dequantize(theirs, GGML[fmt]).view(np.uint32))


@pytest.mark.parametrize("isa", kernel_quant.distinct_isas())
@pytest.mark.parametrize("scale", [1e-3, 1.0, 50.0])
def test_q4_k_torch_and_c_ports_agree_and_gguf_reads_them(isa, scale):
    w = _weights(int(scale * 1000), 24, 512, scale)
    w[3] = w[3].abs()  # a super-block with no negative weight: min 0, dmin 0
    blocks = w.view(-1, 256)
    torch_bytes = q4_k.quantize_q4_k(blocks)
    c_bytes = kernel_quant.quantize_q4_k(blocks.contiguous(), isa)
    assert torch.equal(torch_bytes, c_bytes), f"{int((torch_bytes != c_bytes).any(1).sum())} super-blocks differ"
    decoded = gguf.quants.dequantize(torch_bytes.numpy(), T.Q4_K)
    assert np.array_equal(q4_k.dequantize_q4_k(torch_bytes).numpy().view(np.uint32), decoded.view(np.uint32))
    # the search must do better than plain min/max 4-bit rounding (Q4_1 on the same weights)
    q4_1_err = (quant.dequantize(quant.quantize(w, "q4_1"), "q4_1") - w).pow(2).sum()
    assert float((torch.from_numpy(decoded).view_as(w) - w).pow(2).sum()) < float(q4_1_err)


@pytest.mark.parametrize("fmt", list(GGML))
def test_gguf_file_round_trip(fmt, tmp_path):
    # The stored bytes are a GGUF tensor's data as is: write them with gguf's writer, read them back.
    w = _weights(5, 6, 512, 1.0)
    blocks = quant.quantize(w, fmt)
    path = tmp_path / "w.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("blk.0.ffn_down.weight", blocks.numpy(), raw_dtype=GGML[fmt])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    assert tensor.tensor_type == GGML[fmt] and list(tensor.shape) == [512, 6]  # GGUF lists dims innermost first
    assert np.array_equal(np.asarray(tensor.data).reshape(blocks.shape), blocks.numpy())


def test_bad_inputs_raise_one_line_config_errors():
    with pytest.raises(ConfigError, match="unknown quantized format 'q5_0'"):
        quant.quantize(torch.zeros(2, 32), "q5_0")
    with pytest.raises(ConfigError, match="48 inputs, not a multiple of q8_0's block of 32"):
        quant.quantize(torch.zeros(2, 48), "q8_0")
    with pytest.raises(ConfigError, match="not a multiple of q4_k's block of 256"):
        quant.quantize(torch.zeros(2, 128), "q4_k")
    with pytest.raises(ConfigError, match="2-d"):
        quant.quantize(torch.zeros(32), "q4_0")
    with pytest.raises(ConfigError, match="uint8"):
        quant.dequantize(torch.zeros(2, 33, dtype=torch.uint8), "q8_0")


@pytest.mark.parametrize("fmt", list(quant.FORMATS))
def test_quantizing_is_host_work_whatever_the_default_device(fmt):
    # bench.gpu builds its models under `with torch.device("cuda")`; the blocks (and the C Q4_K
    # quantizer's output, which it writes through a pointer) must still be made on the CPU. The meta
    # device stands in for the GPU here: a tensor made there would come back without data.
    weight = torch.randn(16, 256, generator=torch.Generator().manual_seed(0))
    want = quant.quantize(weight, fmt)
    with torch.device("meta"):
        got = quant.quantize(weight, fmt)
    assert got.device.type == "cpu" and torch.equal(got, want)
