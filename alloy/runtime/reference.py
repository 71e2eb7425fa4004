"""The single-process run every distributed run must equal: same init, data, loss and optimizer."""

from __future__ import annotations

import torch

from alloy.model import Transformer
from alloy.model.init import init_params
from alloy.runtime.data import DataSource
from alloy.runtime.engine import OptimConfig, token_loss_sum
from alloy.spec import ModelSpec


def reference_run(spec: ModelSpec, *, steps: int, global_batch: int, seq_len: int, data: DataSource,
                  seed: int = 0, optim: OptimConfig | None = None, grad_accum: int = 1,
                  dtype: torch.dtype = torch.float32):
    """Train the whole model in this process, its parameters in `dtype`; return (losses per step,
    final state dict)."""
    model = init_params(Transformer(spec), seed).to(dtype).train()
    optim = optim or OptimConfig()
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                                  weight_decay=optim.weight_decay, eps=optim.eps)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for k in range(grad_accum):
            batch = data.batch(step * grad_accum + k, global_batch, seq_len, spec.vocab_size)
            loss = token_loss_sum(model(batch[:, :-1]), batch[:, 1:]) / (grad_accum * global_batch * seq_len)
            loss.backward()
            total += loss.item()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(step, steps)
        optimizer.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
