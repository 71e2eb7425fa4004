"""Measure what one layer of a given model really costs on this device: profile-guided planning.

FLOP-rate estimates miss what small models pay on CPUs (per-op overhead, small GEMMs, norms,
attention softmax). Timing one Transformer block forward+backward — and the embedding and head
pieces — at a few micro-batch sizes gives the planner a MeasuredLayerTimes row it uses in
place of its estimate (alloy.plan.timing interpolates between batch sizes).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from alloy.devices.schema import MeasuredLayerTimes
from alloy.spec import ModelSpec

WHOLE_MODEL_MAX_PARAMS = 200_000_000  # build and time the whole model too, up to this size


def _time(fn, repeats: int, device: str) -> float:
    # time_call batches short calls into repetitions long enough to include a quota slice's throttling.
    from alloy.devices.measure import time_call

    return time_call(fn, torch.device(device), budget_s=30.0, min_reps=repeats, max_reps=repeats)


def measure_layer_times(spec: ModelSpec, seq_len: int, batches: tuple[int, ...] = (1, 2, 4, 8), *,
                        repeats: int = 3, device: str = "cpu") -> MeasuredLayerTimes:
    """Forward+backward seconds of one block, of the embeddings, and of final norm + head + loss."""
    from alloy.model import Transformer
    from alloy.model.init import init_params

    batches = tuple(sorted(set(batches)))  # the profile's rows are strictly increasing batch sizes
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

        layer_s.append(_time(run_block, repeats, device))
        first_s.append(_time(run_embed, repeats, device))
        last_s.append(_time(run_head, repeats, device))
    # Pieces timed alone run warmer than a whole stage (caches, allocator, one graph): where the
    # whole model is small enough to build here, it is timed at the smallest and largest batch and
    # every row is scaled to match it (linearly in batch size between the two).
    source = f"timed forward+backward on {device}, median of {repeats}"
    if spec.num_params() <= WHOLE_MODEL_MAX_PARAMS:
        model = init_params(Transformer(spec), 0).to(device)
        ends = (batches[0], batches[-1]) if len(batches) > 1 else (batches[0],)
        factors = []
        for batch in ends:
            ids = torch.randint(0, spec.vocab_size, (batch, seq_len + 1), device=device)

            def run_model():
                F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
            whole_s = _time(run_model, repeats, device)
            k = batches.index(batch)
            factors.append(whole_s / (spec.num_layers * layer_s[k] + first_s[k] + last_s[k]))
        for k, batch in enumerate(batches):
            f = float(np.interp(batch, ends, factors)) if len(ends) > 1 else factors[0]
            layer_s[k], first_s[k], last_s[k] = f * layer_s[k], f * first_s[k], f * last_s[k]
        source += f"; scaled to the whole model's time ({', '.join(f'{f:.2f}x' for f in factors)})"
    return MeasuredLayerTimes(model=f"{spec.family} h{spec.hidden_size} x{spec.num_layers} seq {seq_len}",
                              hidden_size=spec.hidden_size, num_layers=spec.num_layers, phase="train",
                              batch=[float(b) for b in batches], layer_s=layer_s, first_s=first_s, last_s=last_s,
                              source=source)


def layer_probe(spec: ModelSpec, seq_len: int, batches: tuple[int, ...]) -> tuple[str, dict]:
    """What `alloy.devices.measure_slice(probe=...)` runs inside a slice to time this model's layers."""
    return f"{__name__}:_probe", {"spec": spec.to_dict(), "seq_len": seq_len, "batches": list(batches)}


def _probe(spec: dict, seq_len: int, batches: list[int]) -> dict:
    times = measure_layer_times(ModelSpec.from_dict(spec), seq_len, tuple(batches))
    return {"layer_times": [times.model_dump()]}
