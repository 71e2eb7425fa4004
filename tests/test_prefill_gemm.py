"""Prefill's GEMM (alloy.kernels.gemm): PyTorch's F.linear or oneDNN's linear, by what the machine
measured, and for bf16 weights PyTorch's bf16 GEMM or the fp32 one. Each choice against float64 on
the same weights (hypothesis over shapes, bias or not, 2-D and 3-D inputs); the race measured once
and read by a later process unchanged; a bad setting is a one-line ConfigError."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alloy.errors import ConfigError
from alloy.infer.optimize import DecodeLinear
from alloy.kernels import gemm

CHOICES = ["torch"] + (["onednn"] if gemm._onednn_runs() else [])


def _tolerance(x, w):
    # fp32 sums of k products in another order than float64's: a few ulps per term
    return 1e-5 * (x.shape[-1] ** 0.5) * float(x.abs().max() * w.abs().max()) + 1e-6


def _under(setting: str, value: str, call):
    """call() with the environment variable `setting` = value (hypothesis tests take no monkeypatch)."""
    os.environ[setting] = value
    try:
        with torch.inference_mode():
            return call()
    finally:
        del os.environ[setting]


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 37), with_bias=st.booleans(),
       three_d=st.booleans(), which=st.sampled_from(CHOICES), seed=st.integers(0, 2**16))
def test_each_gemm_equals_float64(rows, k, n, with_bias, three_d, which, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
    b = torch.randn(n, generator=g) if with_bias else None
    want = x.double() @ w.double().t() + (0 if b is None else b.double())
    if three_d:
        x, want = x.view(1, rows, k), want.view(1, rows, n)
    got = _under("ALLOY_PREFILL_GEMM", which, lambda: gemm.linear(x, w, b))
    assert got.shape == want.shape and got.dtype == torch.float32
    assert (got.double() - want).abs().max() <= _tolerance(x, w)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), k=st.integers(1, 70), n=st.integers(1, 37), with_bias=st.booleans(),
       which=st.sampled_from(gemm.BF16_CHOICES), seed=st.integers(0, 2**16))
def test_each_bf16_gemm_equals_float64_on_bf16_operands(rows, k, n, with_bias, which, seed):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g) if with_bias else None
    got = _under("ALLOY_PREFILL_BF16", which, lambda: gemm.linear_bf16(x, w, b))
    product = x.bfloat16().double() @ w.double().t()
    want = product + (0 if b is None else b.double())
    # the fp32 sums' error, and for PyTorch's bf16 GEMM the rounding of its output (half an ulp, 2^-9)
    tol = _tolerance(x, w) + (2**-8 * product.abs() if which == "bf16" else 0)
    assert got.dtype == torch.float32 and ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("which", CHOICES)
@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8"])
def test_decode_linear_prefill_takes_the_chosen_gemm(which, storage, monkeypatch):
    monkeypatch.setenv("ALLOY_PREFILL_GEMM", which)
    monkeypatch.setenv("ALLOY_PREFILL_BF16", "fp32")  # the fp32 GEMM chosen above, on bf16 operands
    g = torch.Generator().manual_seed(4)
    w, x, b = torch.randn(33, 70, generator=g), torch.randn(2, 20, 70, generator=g), torch.randn(33, generator=g)
    layer = DecodeLinear(w, b, storage)  # 40 rows: past the GEMV kernels, the prefill GEMM
    stored = layer.weight.double() * (1 if layer.scale is None else layer.scale.double()[:, None])
    operand = x.bfloat16() if storage == "bf16" else x
    with torch.inference_mode():
        got = layer(x)
    assert (got.double() - (operand.double() @ stored.t() + b.double())).abs().max() <= _tolerance(x, w)


def test_inputs_autograd_tracks_go_to_pytorch(monkeypatch):
    monkeypatch.setenv("ALLOY_PREFILL_GEMM", CHOICES[-1])
    x, w = torch.randn(20, 8, requires_grad=True), torch.randn(4, 8)
    gemm.linear(x, w).sum().backward()
    assert torch.allclose(x.grad, w.sum(0).expand(20, 8))


RACES = [  # (what, the choice, its cached measurement, its record's name in the kernel cache, the choices)
    pytest.param("choice", "_measured", "prefill-gemm-" + "?" * 16 + ".json", gemm.CHOICES, id="fp32",
                 marks=pytest.mark.skipif(len(CHOICES) < 2, reason="this PyTorch has no oneDNN linear: nothing to choose")),
    pytest.param("bf16_choice", "_measured_bf16", "prefill-gemm-bf16-*.json", gemm.BF16_CHOICES, id="bf16"),
]


@pytest.mark.parametrize("choose, measured, record_name, choices", RACES)
def test_the_choice_is_measured_once_per_machine_and_every_process_reads_it(choose, measured, record_name, choices,
                                                                           tmp_path, monkeypatch):
    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path))
    for setting in ("ALLOY_PREFILL_GEMM", "ALLOY_PREFILL_BF16"):
        monkeypatch.delenv(setting, raising=False)
    getattr(gemm, measured).cache_clear()
    try:
        chosen = getattr(gemm, choose)()
    finally:
        gemm._measured.cache_clear()  # later tests measure in their own cache
        gemm._measured_bf16.cache_clear()
    (record_path,) = tmp_path.glob(f"kernels/{record_name}")
    record = json.loads(record_path.read_text())
    assert record["gemm"] == chosen == min(record["seconds"], key=record["seconds"].get)
    assert set(record["seconds"]) == set(choices) and record["threads"] == torch.get_num_threads()
    stamp = record_path.stat().st_mtime_ns
    code = ("import torch; from alloy.kernels import gemm; "
            f"torch.set_num_threads({torch.get_num_threads()}); print(gemm.{choose}())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "ALLOY_CACHE_DIR": str(tmp_path)}).stdout
    assert out.strip() == chosen and record_path.stat().st_mtime_ns == stamp


def test_a_bad_bf16_gemm_setting_is_a_config_error(monkeypatch):
    monkeypatch.setenv("ALLOY_PREFILL_BF16", "fp16")
    with pytest.raises(ConfigError, match="ALLOY_PREFILL_BF16='fp16': choose from bf16, fp32") as err:
        DecodeLinear(torch.randn(4, 8), None, "bf16")(torch.randn(20, 8))
    assert "\n" not in str(err.value)


def test_a_bad_gemm_setting_is_a_config_error(monkeypatch):
    monkeypatch.setenv("ALLOY_PREFILL_GEMM", "blas")
    with pytest.raises(ConfigError, match="ALLOY_PREFILL_GEMM='blas': choose from torch, onednn") as err:
        gemm.linear(torch.randn(20, 8), torch.randn(4, 8))
    assert "\n" not in str(err.value)
