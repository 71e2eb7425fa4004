"""Weight-only int8 (per output channel, symmetric), applied to an unmodified model by module swap.

Each nn.Linear becomes an Int8Linear holding int8 weights [out, in] and one scale per output
row (max |w| / 127), so a weight is off by at most half a step: |w - s q| <= s / 2. Activations
stay in the model's float dtype. On CPU the matmul is PyTorch's `_weight_int8pack_mm` (an int8
GEMV that reads the int8 bytes directly); elsewhere the weight is dequantised inside the op
(gpt-fast's form, which torch.compile fuses on CUDA). On a CPU with Alloy's kernels,
alloy.infer.optimize uses its own DecodeLinear instead (same rounding, `int8_rows`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q, scale [out]) with w ~= q * scale[:, None], one symmetric scale per row."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = int8_rows(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(x.dtype)
        # PyTorch's CPU kernel reads 8 inputs at a time and crashes (SIGSEGV, torch 2.13) when
        # in_features is not a multiple of 8: those layers dequantise instead.
        if x.device.type == "cpu" and self.in_features % 8 == 0:
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, scale)
            out = out.view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * scale
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_int8(model: nn.Module, *, skip: tuple[str, ...] = ()) -> nn.Module:
    """Swap every nn.Linear (except names containing one of `skip`) for an Int8Linear, in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and not any(s in full for s in skip):
                setattr(module, child_name, Int8Linear(child))
    return model
