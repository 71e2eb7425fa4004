"""Alloy's planner with a serving-throughput objective (issue 11, item 4a).

`make_plan` minimises the step time of a batch: under the serving model of `serving` that is not what
bounds offline decode on Helix's prototype (the host's requests in flight, set by the tightest layer's
KV room, over the token round trip). This module keeps the planner's building blocks and swaps the
objective:

1. candidates: `make_plan` layouts for a few offline concurrency settings and data-parallel degrees
   (its device grouping, order and layer cuts);
2. each candidate's layer cuts are refined by hill climbing on the serving model's predicted tokens/s:
   move one layer across the boundary of two adjacent stages of a pipeline, keep the move if the
   prediction improves, until no move helps or the time budget is spent;
3. the best candidate wins. Its layer placement is a plain `{device: (first, stop)}` (disjoint
   pipelines, no overlapping ranges), the form Helix's prototype runs.

Nothing here is fitted; the score is whatever `score(placement)` returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from alloy.devices import Inventory
from alloy.errors import PlanError
from alloy.plan import Workload, make_plan
from alloy.spec import ModelSpec

Placement = dict[str, tuple[int, int]]


@dataclass
class ServingPlan:
    placement: Placement
    tokens_per_s: float
    seconds: float  # wall time of the whole search, make_plan calls included
    origin: str  # which make_plan candidate it started from
    candidates: list[tuple[str, float, float]] = field(default_factory=list)  # (origin, start tok/s, refined tok/s)


def _pipelines(placement: Placement) -> list[list[str]]:
    """Device chains of a disjoint placement: each starts at layer 0 and follows the cuts."""
    by_start: dict[int, list[str]] = {}
    for name, (a, _) in placement.items():
        by_start.setdefault(a, []).append(name)
    chains = []
    for head in by_start.get(0, []):
        chain = [head]
        while (stop := placement[chain[-1]][1]) in by_start and by_start[stop]:
            chain.append(by_start[stop].pop())
        chains.append(chain)
    return chains


def refine(placement: Placement, score: Callable[[Placement], float], deadline: float) -> tuple[Placement, float]:
    """Hill climbing on the layer cuts: one layer across one boundary at a time (first improvement)."""
    best, best_s = dict(placement), score(placement)
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for chain in _pipelines(best):
            for left, right in zip(chain, chain[1:]):
                for step in (1, -1):  # +1: the left stage takes a layer from the right one
                    (a, b), (c, d) = best[left], best[right]
                    if b + step <= a or c + step >= d:
                        continue
                    trial = dict(best)
                    trial[left], trial[right] = (a, b + step), (c + step, d)
                    s = score(trial)
                    if s > best_s * (1 + 1e-9):
                        best, best_s, improved = trial, s, True
                        break
                if time.perf_counter() >= deadline:
                    return best, best_s
    return best, best_s


def plan_for_serving(spec: ModelSpec, inventory: Inventory, score: Callable[[Placement], float], *,
                     prompt_tokens: int, output_tokens: int, batches: tuple[int, ...] = (64, 256),
                     replicas: tuple[int | None, ...] = (None, 2), budget_s: float = 8.0) -> ServingPlan:
    """The placement with the highest `score` among refined `make_plan` candidates, within `budget_s`."""
    started = time.perf_counter()
    starts = []
    for batch in batches:
        for r in replicas:
            work = Workload(task="infer", batch_size=batch, seq_len=prompt_tokens, new_tokens=output_tokens,
                            dtype="fp16")
            try:
                plan = make_plan(spec, inventory, work, replicas=r)
            except PlanError:
                continue
            place = {s.device: (int(s.layers[0]), int(s.layers[1])) for rep in plan.replicas for s in rep.stages}
            starts.append((f"make_plan batch {batch}, {len(plan.replicas)} pipeline(s)", place, score(place)))
    if not starts:
        raise PlanError("make_plan found no layout for this inventory")
    starts.sort(key=lambda c: -c[2])
    results = []
    for i, (origin, place, start_s) in enumerate(starts):  # best start first; share what time is left
        left = budget_s - (time.perf_counter() - started)
        deadline = time.perf_counter() + max(left, 0.0) / (len(starts) - i)
        refined, refined_s = refine(place, score, deadline)
        results.append((origin, start_s, refined_s, refined))
    origin, _, best_s, best = max(results, key=lambda r: r[2])
    return ServingPlan(best, best_s, time.perf_counter() - started, origin,
                       [(o, s0, s1) for o, s0, s1, _ in results])
