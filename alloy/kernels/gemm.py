"""Prefill's GEMM on dense fp32 or bf16 weights: PyTorch's F.linear or oneDNN's linear, whichever
this machine measured faster.

F.linear's fp32 GEMM on x86 is MKL's, tuned for Intel's CPUs. On an AMD EPYC (Zen 4, 2 threads) it
ran the ~98M Llama's layers at 88-151 GFLOP/s where oneDNN's linear on the same dense tensors
(torch.ops.mkldnn._linear_pointwise: what torch.compile's CPU code calls; no copy of the weight to
keep) ran 154-202, at 128 and 512 rows. Which wins depends on the CPU, so each machine races the two
once per thread count on a 1024 x 1024 layer and keeps the answer in the kernel cache
(kernels.measured_once: every process, every rank of a job, takes the same one).
ALLOY_PREFILL_GEMM=torch|onednn sets it instead. Both are fp32 products summed in fp32, in
different orders.

bf16 weights (`linear_bf16`) take bf16 operands, as the decode kernels do (gemv.c): the activation
rounded to bf16, products exact in fp32, fp32 sums. Then either PyTorch's bf16 GEMM, whose output is
rounded to bf16 too (oneDNN's, on `vdpbf16ps` or AMX where the CPU has them: 370-420 GFLOP/s on 2
cores of a Zen 4 against 185-215 for fp32), or the fp32 GEMM above on the weight widened to fp32
(where bf16 arithmetic is emulated: ~1.4 GFLOP/s on an AVX2-only Zen 3). Raced the same way;
ALLOY_PREFILL_BF16=bf16|fp32 sets it instead.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from alloy.errors import ConfigError

CHOICES = ("torch", "onednn")
BF16_CHOICES = ("bf16", "fp32")
RACE_ROWS, RACE_WIDTH = 256, 1024
RACE_VERSION = 1


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) on the faster GEMM here (fp32 CPU tensors without autograd;
    anything else goes to F.linear)."""
    if (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu" and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and choice() == "onednn"):
        y = _onednn_linear(x.reshape(-1, x.shape[-1]).contiguous(), weight, None if bias is None else bias.contiguous())
        return y.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 x @ bf16 weight.T + fp32 bias, in fp32, with x rounded to bf16 first (module docstring)."""
    xb = x.to(torch.bfloat16)
    if bf16_choice() == "bf16":
        y = F.linear(xb, weight).float()
        return y if bias is None else y + bias
    return linear(xb.float(), weight.float(), bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [rows, in] @ weight.T + bias through oneDNN, on dense contiguous tensors (no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def choice() -> str:
    """"torch" or "onednn": ALLOY_PREFILL_GEMM, else what this machine measured at this thread count."""
    forced = os.environ.get("ALLOY_PREFILL_GEMM")
    if forced:
        if forced not in CHOICES:
            raise ConfigError(f"ALLOY_PREFILL_GEMM={forced!r}: choose from {', '.join(CHOICES)}")
        if forced == "onednn" and not _onednn_runs():
            raise ConfigError("ALLOY_PREFILL_GEMM=onednn: this PyTorch has no oneDNN linear")
        return forced
    return _measured(torch.get_num_threads())


def bf16_choice() -> str:
    """"bf16" or "fp32": the GEMM for bf16 weights, ALLOY_PREFILL_BF16 or what this machine measured."""
    forced = os.environ.get("ALLOY_PREFILL_BF16")
    if forced:
        if forced not in BF16_CHOICES:
            raise ConfigError(f"ALLOY_PREFILL_BF16={forced!r}: choose from {', '.join(BF16_CHOICES)}")
        return forced
    return _measured_bf16(torch.get_num_threads(), choice())


@functools.cache
def _onednn_runs() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    x, w = torch.ones(2, 8), torch.ones(4, 8)
    try:
        with torch.no_grad():
            return torch.equal(_onednn_linear(x, w), F.linear(x, w))
    except (AttributeError, RuntimeError, TypeError):  # not in this build, or another signature
        return False


@functools.cache
def _measured(threads: int) -> str:
    from alloy import kernels

    if not _onednn_runs():
        return "torch"
    return kernels.measured_once("prefill-gemm", f"{RACE_VERSION} {threads}", _race)["gemm"]


@functools.cache
def _measured_bf16(threads: int, fp32_gemm: str) -> str:
    from alloy import kernels

    return kernels.measured_once("prefill-gemm-bf16", f"{RACE_VERSION} {threads} {fp32_gemm}", _race_bf16)["gemm"]


def _race_bf16() -> dict:
    """PyTorch's bf16 GEMM against the fp32 one on the widened weight (as linear_bf16 runs each)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(RACE_WIDTH, RACE_WIDTH, generator=g).bfloat16()
    x = torch.randn(RACE_ROWS, RACE_WIDTH, generator=g)
    return _raced({"bf16": lambda: F.linear(x.bfloat16(), w).float(),
                   "fp32": lambda: linear(x.bfloat16().float(), w.float())})


def _race() -> dict:
    """Both fp32 GEMMs on a RACE_WIDTH-square layer at RACE_ROWS rows."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(RACE_WIDTH, RACE_WIDTH, generator=g), torch.randn(RACE_ROWS, RACE_WIDTH, generator=g)
    return _raced({"torch": lambda: F.linear(x, w), "onednn": lambda: _onednn_linear(x, w)})


def _raced(contenders: dict) -> dict:
    """Each contender's best of 3 (kernels.best_of) and the fastest's name: a race's record."""
    from alloy import kernels

    with torch.no_grad():
        seconds = {name: kernels.best_of(call) for name, call in contenders.items()}
    return {"gemm": min(seconds, key=seconds.get), "seconds": seconds, "rows": RACE_ROWS, "width": RACE_WIDTH,
            "threads": torch.get_num_threads()}
