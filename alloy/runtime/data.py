"""Global batches that every rank can rebuild alone: the same step gives the same tokens.

Each rank slices its replica's rows out of the global batch, so no data moves between ranks
and a single process given the same source sees exactly the same batches — which is also what
makes a resumed run continue exactly: the batch depends on the step number only.

The token file (alloy.train.data) is int32. A token that must not be a loss target (a chat
example's system and user turns, padding, the first token of a packed unit) is stored as
-(id + 1): -1 is id 0, -2 is id 1, and so on. It is still an input; as a target it becomes
IGNORE_INDEX (`split_batch`). Raw text and random data are never negative: every target counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from alloy.errors import ConfigError


IGNORE_INDEX = -100  # F.cross_entropy's ignore_index: a target that carries no loss


def split_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of stored token rows [B, seq_len + 1]: the ids of [:, :-1], and the ids of
    [:, 1:] with no-loss tokens as IGNORE_INDEX. Both new contiguous tensors: a pipeline stage
    checks its inputs' strides against its (contiguous) shape metadata, and torch 2.11's check
    refuses row views."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    return torch.where(inputs < 0, -inputs - 1, inputs), torch.where(targets < 0, IGNORE_INDEX, targets)


def loss_target_count(batch: torch.Tensor) -> int:
    """How many of the rows' next-token targets carry loss (all of them for text and random data)."""
    return int((batch[:, 1:] >= 0).sum())


@dataclass(frozen=True)
class DataSource:
    kind: str = "random"  # "random": seeded token ids; "tokens": an int32 token file (alloy.train.data)
    seed: int = 0
    path: str = ""
    start: int = 0  # token range [start, end) of the file; end 0 means to the end
    end: int = 0

    def batch(self, step: int, batch_size: int, seq_len: int, vocab_size: int) -> torch.Tensor:
        """Token ids [batch_size, seq_len + 1] for `step` (inputs and their next-token targets)."""
        if self.kind == "random":
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            return torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=generator)
        if self.kind == "tokens":
            return self._blocks(step, batch_size, seq_len)
        raise ConfigError(f"data kind {self.kind!r} is not one of: random, tokens")

    def num_blocks(self, seq_len: int) -> int:
        tokens = self._tokens()
        return max(0, (len(tokens) - 1) // seq_len)

    def _blocks(self, step: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """Packed blocks of seq_len + 1 tokens; each epoch visits every block once, shuffled by a
        permutation seeded by (seed, epoch)."""
        tokens = self._tokens()
        blocks = self.num_blocks(seq_len)
        if blocks < 1:
            raise ConfigError(f"{self.path}: {len(tokens)} tokens is shorter than one block of {seq_len + 1}")
        rows = []
        for sample in range(step * batch_size, (step + 1) * batch_size):
            epoch, index = divmod(sample, blocks)
            block = int(self._permutation(epoch, blocks)[index])
            rows.append(np.asarray(tokens[block * seq_len : block * seq_len + seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def _permutation(self, epoch: int, blocks: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_perms", {})
        if epoch not in cache:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            cache.clear()  # one epoch at a time is enough: samples arrive in order
            cache[epoch] = torch.randperm(blocks, generator=generator)
        return cache[epoch]

    def _tokens(self) -> np.ndarray:
        if "_map" not in self.__dict__:
            try:
                mapped = np.memmap(self.path, dtype=np.int32, mode="r")
            except (OSError, ValueError) as err:
                raise ConfigError(f"{self.path}: cannot map the token file ({err})") from None
            self.__dict__["_map"] = mapped[self.start : self.end or len(mapped)]
        return self.__dict__["_map"]
