"""The single-process run every distributed run must equal: same init, data, loss and optimizer."""

from __future__ import annotations

import torch

from alloy.model import Transformer
from alloy.model.init import init_params
from alloy.runtime.data import DataSource
from alloy.runtime.engine import OptimConfig, token_loss_sum
from alloy.spec import ModelSpec


def reference_run(spec: ModelSpec, *, steps: int, global_batch: int, seq_len: int, data: DataSource,
                  seed: int = 0, optim: OptimConfig | None = None):
    """Train the whole model in this process; return (losses per step, final state dict)."""
    model = init_params(Transformer(spec), seed).train()
    optim = optim or OptimConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                  weight_decay=optim.weight_decay, eps=optim.eps)
    losses = []
    for step in range(steps):
        batch = data.batch(step, global_batch, seq_len, spec.vocab_size)
        optimizer.zero_grad(set_to_none=True)
        loss = token_loss_sum(model(batch[:, :-1]), batch[:, 1:]) / (global_batch * seq_len)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
