"""Measure what one layer of a given model really costs on this device: profile-guided planning.

FLOP-rate estimates miss what small models pay on CPUs (per-op overhead, small GEMMs, norms,
attention softmax). Timing one Transformer block forward+backward — and the embedding and head
pieces — at a few micro-batch sizes gives the planner a MeasuredLayerTimes row it uses in
place of its estimate (alloy.plan.timing interpolates between batch sizes).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from alloy.devices.schema import MeasuredLayerTimes
from alloy.spec import ModelSpec


def _time(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernel selection
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def measure_layer_times(spec: ModelSpec, seq_len: int, batches: tuple[int, ...] = (1, 2, 4, 8), *,
                        repeats: int = 3, device: str = "cpu") -> MeasuredLayerTimes:
    """Forward+backward seconds of one block, of the embeddings, and of final norm + head + loss."""
    from alloy.model import Transformer
    from alloy.model.init import init_params

    torch.manual_seed(0)
    middle = spec.num_layers // 2
    block = init_params(Transformer(spec, (middle, middle + 1), embed=False, head=False), 0).to(device)
    embed = init_params(Transformer(spec, (0, 0), embed=True, head=False), 0).to(device)
    head = init_params(Transformer(spec, (spec.num_layers, spec.num_layers), embed=False, head=True), 0).to(device)
    layer_s, first_s, last_s = [], [], []
    for batch in batches:
        ids = torch.randint(0, spec.vocab_size, (batch, seq_len), device=device)
        hidden = torch.randn(batch, seq_len, spec.hidden_size, device=device, requires_grad=True)

        def run_block():
            block(hidden).sum().backward()

        def run_embed():
            embed(ids).sum().backward()

        def run_head():
            F.cross_entropy(head(hidden).flatten(0, 1), ids.flatten()).backward()

        layer_s.append(_time(run_block, repeats))
        first_s.append(_time(run_embed, repeats))
        last_s.append(_time(run_head, repeats))
    return MeasuredLayerTimes(model=f"{spec.family} h{spec.hidden_size} x{spec.num_layers} seq {seq_len}",
                              hidden_size=spec.hidden_size, num_layers=spec.num_layers, phase="train",
                              batch=[float(b) for b in batches], layer_s=layer_s, first_s=first_s, last_s=last_s,
                              source=f"timed forward+backward on {device}, median of {repeats}")
