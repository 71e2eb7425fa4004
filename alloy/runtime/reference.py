"""The single-process run every distributed run must equal: same init, data, loss and optimizer."""

from __future__ import annotations

import torch

from alloy.model import Transformer
from alloy.model.init import init_params
from alloy.runtime.data import DataSource, loss_target_count, split_batch
from alloy.runtime.engine import OptimConfig, token_loss_sum
from alloy.spec import ModelSpec


def reference_run(spec: ModelSpec, *, steps: int, global_batch: int, seq_len: int, data: DataSource,
                  seed: int = 0, optim: OptimConfig | None = None, grad_accum: int = 1,
                  dtype: torch.dtype = torch.float32, model: torch.nn.Module | None = None):
    """Train the whole model in this process, its parameters in `dtype`; return (losses per step,
    final state dict). `model`: one already built (LoRA, QLoRA: only what requires grad trains)."""
    model = (init_params(Transformer(spec), seed) if model is None else model).to(dtype).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = optim or OptimConfig()
    optimizer = torch.optim.AdamW(trainable, lr=optim.lr, betas=optim.betas,
                                  weight_decay=optim.weight_decay, eps=optim.eps)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        batches = [data.batch(step * grad_accum + k, global_batch, seq_len, spec.vocab_size) for k in range(grad_accum)]
        targets_with_loss = sum(loss_target_count(batch) for batch in batches)  # as the engine weighs them
        total = 0.0
        for batch in batches:
            inputs, targets = split_batch(batch)
            loss = token_loss_sum(model(inputs), targets) / targets_with_loss
            loss.backward()
            total += loss.item()
        if optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, optim.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = optim.lr_at(step, steps)
        optimizer.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}
