"""Make a loaded model fast at decoding, as functions applied to it (the model code stays plain).

Decoding one token is a chain of GEMVs (one activation row against every weight), so its speed
is how fast the weights stream from memory plus a fixed cost per op. `prepare(model, dtype)`:

- fuses q/k/v and gate/up into one matmul each (fewer ops, longer GEMVs),
- fp32: stores weights k-major ([in, out], `x @ w`), the layout MKL's fp32 GEMV streams fastest
  here (measured: see docs/INFERENCE.md); bf16 keeps [out, in], which its kernel prefers,
- int8: per-channel weight-only int8 (alloy.infer.quantize) with bf16 activations.

The result is for inference only: its state dict no longer matches the checkpoint's names.
"""

from __future__ import annotations

import torch
from torch import nn

from alloy.errors import ConfigError
from alloy.infer.quantize import quantize_int8
from alloy.model.layers import MLP, Attention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}  # int8: activation dtype


def parse_dtype(name: str) -> str:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {name!r} for generation; choose from {', '.join(DTYPES)}")
    return name


class KMajorLinear(nn.Module):
    """y = x @ w_t + b with w_t stored [in, out] contiguous."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = linear.bias

    def forward(self, x):
        out = x @ self.weight_t
        return out if self.bias is None else out + self.bias


def _cat_linear(parts: list[nn.Linear]) -> nn.Linear:
    first = parts[0]
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, Attention) and module.wqkv is None:
            module.wqkv = _cat_linear([module.wq, module.wk, module.wv])
            del module.wq, module.wk, module.wv
        if isinstance(module, MLP) and module.gated and module.gate_up is None:
            module.gate_up = _cat_linear([module.gate, module.up])
            del module.gate, module.up
    return model


@torch.no_grad()
def prepare(model: nn.Module, dtype: str = "fp32", *, fuse: bool = True) -> nn.Module:
    """Convert `model` in place for fast decoding in `dtype` (fp32, bf16 or int8) and return it."""
    dtype = parse_dtype(dtype)
    model.eval().requires_grad_(False)
    model.to(DTYPES[dtype])
    if fuse:
        fuse_projections(model)
    if dtype == "int8":
        quantize_int8(model)
    elif dtype == "fp32" and next(model.parameters()).device.type == "cpu":
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(module, name, KMajorLinear(child))
    return model
