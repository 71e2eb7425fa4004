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


class SlotCache(KVCache):
    """A cache whose rows fill independently (continuous batching): `length` is a [B] tensor, each
    row's next slot. A forward writes row b's T new keys at its slots [length[b], length[b] + T)
    and each query attends to its own row's slots up to itself. `rows(a, b)` is a view of rows
    [a, b) sharing the buffers, so one request can be prefilled alone and then decode with the rest.
    """

    def __init__(self, spec: ModelSpec, layers, batch_size: int, max_len: int, *, device=None, dtype=None):
        super().__init__(spec, layers, batch_size, max_len, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def length(self) -> torch.Tensor:
        return self.lengths

    @length.setter
    def length(self, value) -> None:
        if hasattr(self, "lengths"):  # in place, so a view's update reaches the whole cache
            self.lengths.copy_(torch.as_tensor(value, dtype=torch.long))

    def rows(self, first: int, last: int) -> "SlotCache":
        view = SlotCache.__new__(SlotCache)
        view.k = {i: t[first:last] for i, t in self.k.items()}
        view.v = {i: t[first:last] for i, t in self.v.items()}
        view.max_len, view.lengths = self.max_len, self.lengths[first:last]
        return view

    def update(self, layer: int, start: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B, _, T, _ = k.shape
        rows = torch.arange(B, device=k.device)[:, None]
        slots = start[:, None] + torch.arange(T, device=k.device)  # [B, T]
        end = int(start.max()) + T
        cache_k, cache_v = self.k[layer], self.v[layer]
        cache_k[rows, :, slots] = k.transpose(1, 2).to(cache_k.dtype)  # indexed as [B, T, kv_heads, hd]
        cache_v[rows, :, slots] = v.transpose(1, 2).to(cache_v.dtype)
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.lengths.zero_()
