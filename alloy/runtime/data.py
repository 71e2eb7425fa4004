"""Global batches that every rank can rebuild alone: the same step gives the same tokens.

Each rank slices its replica's rows out of the global batch, so no data moves between ranks
and a single process given the same source sees exactly the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load_file

from alloy.errors import ConfigError


@dataclass(frozen=True)
class DataSource:
    kind: str = "random"  # "random": seeded token ids; "tokens": a 1-D token stream in safetensors
    seed: int = 0
    path: str = ""

    def batch(self, step: int, batch_size: int, seq_len: int, vocab_size: int) -> torch.Tensor:
        """Token ids [batch_size, seq_len + 1] for `step` (inputs and their next-token targets)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.kind == "random":
            return torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        if self.kind == "tokens":
            stream = self._stream()
            blocks = (stream.numel() - 1) // seq_len
            if blocks < 1:
                raise ConfigError(f"{self.path}: {stream.numel()} tokens is shorter than one block of {seq_len + 1}")
            picks = torch.randint(0, blocks, (batch_size,), generator=generator)
            return torch.stack([stream[i * seq_len : i * seq_len + seq_len + 1] for i in picks.tolist()])
        raise ConfigError(f"data kind {self.kind!r} is not one of: random, tokens")

    def _stream(self) -> torch.Tensor:
        if not hasattr(self, "_cached"):
            tensors = load_file(self.path)
            if "tokens" not in tensors:
                raise ConfigError(f"{self.path}: no 'tokens' tensor")
            object.__setattr__(self, "_cached", tensors["tokens"].long().flatten())
        return self._cached
