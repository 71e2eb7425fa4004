"""Choosing the next token from logits: greedy, temperature, top-k, top-p, min-p, repetition penalty.

All filters work on a batch of rows [B, vocab] in fp32 and keep shapes static (masking, not
slicing), so a batch samples in a handful of ops whatever each row's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alloy.errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # nucleus: keep the smallest set whose probability reaches top_p
    min_p: float = 0.0  # keep tokens with probability >= min_p * the top token's
    repetition_penalty: float = 1.0  # CTRL/HF style: divide positive logits of seen tokens, multiply negative
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 means off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Stateful per generation: owns the random generator so a seed reproduces a run."""

    def __init__(self, sampling: Sampling, device: torch.device | str = "cpu"):
        self.sampling = sampling
        self.generator = None
        if sampling.seed is not None and not sampling.greedy:
            self.generator = torch.Generator(device=device).manual_seed(sampling.seed)

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, vocab]; seen [B, n] token ids so far (for the repetition penalty) -> ids [B]."""
        s = self.sampling
        logits = logits.float()
        if s.repetition_penalty != 1.0 and seen is not None:
            picked = logits.gather(1, seen)
            picked = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
            # a penalty near 0 (5e-324) divides to inf, and inf - inf below is NaN: keep it finite
            big = torch.finfo(logits.dtype).max
            logits = logits.scatter(1, seen, picked.clamp(-big, big))
        if s.greedy:
            return logits.argmax(dim=-1)
        # shifted so the top logit is 0, and divided in float64 (a temperature of 1e-186 is 0 in
        # float32): a tiny temperature sends the rest to -inf instead of everything to NaN
        logits = ((logits - logits.max(dim=-1, keepdim=True).values).double() / s.temperature).float()
        if s.top_k:
            kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if s.min_p:
            probs = probs.masked_fill(probs < s.min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        if s.top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # drop a token when the tokens ranked above it already reach top_p (the top one always stays)
            drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= s.top_p
            drop[:, 0] = False  # a top_p below the dtype's smallest number still keeps one token
            probs = probs.scatter(1, order, sorted_probs.masked_fill(drop, 0.0))
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
