"""Deterministic initialisation by parameter name, so any layer range inits like the whole model.

Each parameter draws from its own generator seeded by (seed, name). A pipeline stage that builds
only layers [a, b) therefore holds exactly the values the whole model would, with no need to
build the whole model first; a tied head's copy draws as the embedding it copies.
"""

from __future__ import annotations

import zlib

import torch

from alloy.model.layers import Norm
from alloy.model.transformer import Transformer

INIT_STD = 0.02


def canonical_name(model: Transformer, name: str) -> str:
    """The name of the logical parameter `name` stands for (a tied head copy -> the embeddings)."""
    if name == "head.weight" and model.spec.tie_embeddings:
        return "embed.tok.weight"
    return name


@torch.no_grad()
def init_params(model: Transformer, seed: int) -> Transformer:
    norms = {id(m.weight) for m in model.modules() if isinstance(m, Norm)}
    for name, param in model.named_parameters():
        key = canonical_name(model, name)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
        if id(param) in norms:
            param.fill_(1.0 - model.spec.norm_offset)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            values = torch.randn(param.shape, generator=generator, dtype=torch.float32) * INIT_STD
            param.copy_(values.to(param.dtype))
    return model


