"""Mixture-of-experts MLP: a router sends each token to experts_per_token of num_experts MLPs.

Routing follows transformers (Mixtral, Qwen3-MoE, OLMoE): softmax over all experts in fp32,
top-k, optionally renormalised to sum to 1, cast back; each expert runs only on its tokens and
its output, times the token's weight, is summed in. Experts are plain `MLP`s named
`experts.{e}`, so a checkpoint's per-expert tensors map one to one and any layer range loads
only its own experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alloy.model.layers import MLP
from alloy.spec import ModelSpec


class MoE(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.top_k = spec.experts_per_token
        self.renormalize = spec.router_renormalize
        self.router = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        width = spec.expert_intermediate_size or spec.intermediate_size
        self.experts = nn.ModuleList(MLP(spec, width) for _ in range(spec.num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, top_k] in x's dtype, expert ids [N, top_k])."""
        logits = self.router(x)  # (N, num_experts)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, hidden)
        weights, experts = self.route(x)
        out = torch.zeros_like(x)
        # (num_experts, N, top_k): which (token, slot) pairs chose each expert
        chosen = F.one_hot(experts, len(self.experts)).permute(2, 0, 1)
        for e in chosen.flatten(1).any(dim=1).nonzero().flatten().tolist():
            token, slot = torch.where(chosen[e])
            y = self.experts[e](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out.reshape(shape)
