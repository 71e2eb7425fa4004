"""Alloy's CPU decode GEMV kernels and the weight-only decode path built on them.

Checked against PyTorch's own matmul on the same (rounded) weights: every storage type, batch
sizes 1-20 (both kernel paths and the prefill fallback), sizes that are not multiples of the
8-wide vectors or the 8-row blocks, with and without bias.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import alloy
from alloy import kernels
from alloy.infer import generate
from alloy.infer.optimize import GEMV_MAX_ROWS, DecodeLinear, prepare
from alloy.kernels import gemm
from alloy.infer.quantize import int8_rows

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler or no AVX2+FMA on this CPU")


def _reference(x, storage, weight, bias):
    """float64 of the stored weights; bf16 takes bf16 operands, so x rounded to bf16 as well."""
    if storage == "int8":
        q, scale = int8_rows(weight)
        w = q.float() * scale[:, None]
    else:
        w = weight.to({"fp32": torch.float32, "bf16": torch.bfloat16}[storage]).float()
    if storage == "bf16":
        x = x.bfloat16()
    return x.double() @ w.double().t() + (0 if bias is None else bias.double())


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 20), k=st.integers(1, 70), n=st.integers(1, 37), storage=st.sampled_from(["fp32", "bf16", "int8"]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_linear_equals_matmul(rows, k, n, storage, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    weight, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    got = DecodeLinear(weight, bias, storage)(x)
    # fp32 accumulation over k terms in a different order than float64: a few ulps per term
    tol = 1e-5 * (k ** 0.5) * float(x.abs().max() * weight.abs().max()) + 1e-6
    want = _reference(x, storage, weight, bias)
    if storage == "bf16" and rows > GEMV_MAX_ROWS and gemm.bf16_choice() == "bf16":
        # PyTorch's bf16 GEMM rounds the product to bf16 (half an ulp: 2^-9) before the bias is added
        tol = tol + 2**-8 * _reference(x, storage, weight, None).abs()
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert ((got.double() - want).abs() <= tol).all()


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 19), k=st.integers(1, 90), n=st.integers(1, 37), storage=st.sampled_from(["fp32", "bf16", "int8"]),
       with_bias=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_every_gemv_variant_equals_float64(rows, k, n, storage, with_bias, seed, data):
    """Each instruction-set variant this CPU runs (AVX-512: 2 x 8 tiles, masked tails; AVX2) against
    float64 on the same stored weights: odd widths, odd row counts, 1-19 activation rows."""
    variant = data.draw(st.sampled_from(kernels.runnable_variants()))
    g = torch.Generator().manual_seed(seed)
    weight, x = torch.randn(n, k, generator=g), torch.randn(rows, k, generator=g)
    bias = torch.randn(n, generator=g) if with_bias else None
    if storage == "int8":
        stored, scale = int8_rows(weight)
    else:
        stored, scale = weight.to({"fp32": torch.float32, "bf16": torch.bfloat16}[storage]).contiguous(), None
    got = kernels.gemv(x, stored, scale, bias, variant=variant)
    tol = 1e-5 * (k ** 0.5) * float(x.abs().max() * weight.abs().max()) + 1e-6
    assert (got.double() - _reference(x, storage, weight, bias)).abs().max() <= tol


def test_the_fastest_variant_is_taken():
    assert kernels.library() is kernels.library(kernels.runnable_variants()[0])
    assert kernels.library("no-such-variant") is None


def test_a_variant_that_does_not_build_gives_way_to_the_next(monkeypatch):
    # e.g. a compiler without -mavx512bf16 on a CPU with AVX512_BF16: the AVX-512 build, not none
    variants = kernels.runnable_variants()
    if len(variants) < 2:
        pytest.skip("this CPU runs one gemv.c variant: nothing to fall back to")
    real = kernels._library
    monkeypatch.setattr(kernels, "_library", lambda variant: None if variant == variants[0] else real(variant))
    kernels._default_library.cache_clear()
    try:
        assert kernels.library() is real(variants[1]) is not None
    finally:
        kernels._default_library.cache_clear()


def test_gemv_runs_on_large_blocks_and_threads():
    # 3 x 1031 x 517: every path (8-row blocks and the tail, 4-row activation blocks) at a real size
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(517, 1031, generator=g), torch.randn(5, 1031, generator=g)
    for variant in kernels.runnable_variants():
        for rows in (1, 5):
            got = kernels.gemv(x[:rows].contiguous(), w, variant=variant)
            assert torch.allclose(got, x[:rows] @ w.t(), rtol=1e-4, atol=1e-3)


def test_gemv_rejects_wrong_inputs():
    with pytest.raises(ValueError, match="fp32"):
        kernels.gemv(torch.zeros(1, 4, dtype=torch.float64), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="rows"):
        kernels.gemv(torch.zeros(1, 5), torch.zeros(3, 4))


def _rounded(weight, storage):
    if storage == "int8":
        q, scale = int8_rows(weight)
        return q.float() * scale[:, None]
    return weight.bfloat16().float() if storage == "bf16" else weight


def _rounded_copy(model, storage):
    """The fp32 model with every linear weight rounded the way `storage` stores it; a tied head
    becomes a separate rounded linear (the embedding lookup itself stays fp32, as in `prepare`)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(_rounded(module.weight, storage))
        if not hasattr(model, "head"):
            model.head = torch.nn.Linear(model.spec.hidden_size, model.spec.vocab_size, bias=False)
            model.head.weight.copy_(_rounded(model.embed.tok.weight, storage))
    if storage == "bf16":  # bf16 operands: each linear's input rounded too
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_pre_hook(lambda _, args: (args[0].bfloat16().float(),))
    return model


@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("name", ["llama-gqa", "llama-tied-bias", "qwen2-bias-sliding", "gpt2"])
def test_decode_equals_fp32_on_rounded_weights(name, storage, saved, monkeypatch):
    # int8 is weight storage only, and bf16 rounds the weights and each matmul's input: the
    # arithmetic is fp32, so the prepared model must agree with an fp32 model whose weights (and,
    # for bf16, the inputs of its linears) were rounded the same way, to fp32 rounding error — in
    # the prefill (18 rows: the fp32 GEMM) and in every decode step (2 rows: the kernels).
    monkeypatch.setenv("ALLOY_PREFILL_BF16", "fp32")  # the bf16 GEMM's rounded output: the next test
    _, directory = saved(name)
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(1, 96, (2, 9), generator=g).tolist()
    reference = _rounded_copy(alloy.load(directory), storage)
    prepared = prepare(alloy.load(directory), storage)
    reference.kv_cache_dtype = getattr(prepared, "kv_cache_dtype", None)  # bf16 keys and values where fused
    assert isinstance(prepared.head, DecodeLinear)
    with torch.no_grad():
        ids = torch.tensor(prompts)
        assert torch.allclose(prepared(ids), reference(ids), rtol=1e-4, atol=1e-4)
    want = [g.tokens for g in generate(reference, prompts, max_new_tokens=8, eos_ids=())]
    assert [g.tokens for g in generate(prepared, prompts, max_new_tokens=8, eos_ids=())] == want


@pytest.mark.parametrize("rows, n, offset", [(1, 768, 0.0), (3, 37, 0.0), (16, 8, 1.0)])
def test_decode_norm_equals_rms_norm(rows, n, offset):
    from alloy.infer.optimize import DecodeNorm
    from alloy.model.layers import Norm

    class Spec:  # the fields Norm reads
        hidden_size, norm, norm_eps, norm_offset = n, "rmsnorm", 1e-6, offset

    norm = Norm(Spec())
    with torch.no_grad():
        norm.weight.copy_(torch.randn(n))
    decode = DecodeNorm(norm)
    for x in (torch.randn(rows, n), torch.randn(20, n)):  # the kernel (<= 16 rows), then PyTorch's formula
        assert torch.allclose(decode(x), norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, fp32, bf16, want", [
    ("bf16", 80e9, 200e9, 200e9),  # vdpbf16ps: bf16 operands at the bf16 rate
    ("bf16", 80e9, 1.4e9, 80e9),   # bf16 emulated: the kernels multiply in fp32 at its rate
    ("int8", 80e9, 200e9, 80e9),   # weight-only int8: fp32 arithmetic
])
def test_a_decode_plan_sees_the_cpu_rate_the_kernels_run_at(dtype, fp32, bf16, want):
    from alloy.devices.schema import DeviceProfile, Inventory
    from alloy.infer.optimize import decode_inventory

    cpu = DeviceProfile(name="cpu", kind="cpu", memory_bytes=2**34, matmul_flops={"fp32": fp32, "bf16": bf16},
                        slow_dtypes={"fp16": "no fast path"}, memory_bandwidth_bytes_per_s=30e9)
    gpu = DeviceProfile(name="cuda:0", kind="cuda", memory_bytes=2**34, matmul_flops={"bf16": 1e14},
                        memory_bandwidth_bytes_per_s=2e12)
    seen = decode_inventory(Inventory(devices=[cpu, gpu]), dtype)
    assert seen.devices[0].matmul_flops == {"fp32": fp32, "bf16": want}
    assert seen.devices[1] == gpu  # other devices as they were
