"""A preallocated (static) KV cache: one K and one V buffer per layer, written in place."""

from __future__ import annotations

import torch

from alloy.spec import ModelSpec


class KVCache:
    def __init__(self, spec: ModelSpec, layers, batch_size: int, max_len: int, *, device=None, dtype=None):
        shape = (batch_size, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.v = {i: torch.zeros(shape, device=device, dtype=dtype) for i in layers}
        self.max_len = max_len
        self.length = 0  # slots written so far; the model advances it after each forward

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, kv_heads, T, hd] at slots [start, start + T); return slots [0, start + T)."""
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.length = 0
