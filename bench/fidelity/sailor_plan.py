"""Alloy's planner on Sailor's clusters: search Sailor-style 3D-parallel plans, scored by the validated
training cost model (`training.sailor_step_s`, median 13% error on the MIT plans).

Search space (what Alloy's `make_plan` cannot express yet, so it is searched here):
- the VMs are those the measured plans of one experiment used (same GPUs, same global batch);
- a stage replica is one whole VM, tensor-parallel over all its GPUs (the TP degree is a fixed input,
  exactly as in every measured MIT plan, and the only case the profile + link tables are validated for);
- pipeline depth p and data-parallel degree d with p * d <= VMs; every assignment of VM types to the
  p x d grid (pipelines are interchangeable, so the grid's columns are taken in sorted order); replicas
  of one stage may be different GPU types;
- micro-batch size among the profiled sizes, with gbs divisible by mbs * d (as in every measured plan);
- layer cuts: min-max balance of the slowest replica per stage (dynamic programming over the 26 slots),
  then hill climbing that moves one cut by one slot while the step-time prediction improves;
- memory: each GPU must hold fp32 weights + gradients + Adam moments (16 B / parameter, `llm_info.json`
  params at that TP degree) plus the activations of the micro-batches 1F1B keeps in flight on that stage
  (`act_mem_bytes` x mbs x min(p - s, micro-batches)), within `basic_cluster_config.json`'s memory.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass, replace

from bench.fidelity.training import PROFILE_NAMES, SailorData, SailorPlan, StagePlan, sailor_step_s

REFINE_TOP = 32  # candidates (of the balanced-cut scoring) that get hill-climbed
ADAM_BYTES_PER_PARAM_BYTE = 4  # fp32 weight + gradient + two Adam moments = 4 x the fp32 parameter bytes


@dataclass(frozen=True)
class SearchResult:
    plan: SailorPlan
    predicted_s: float
    seconds: float
    evaluated: int


def mem_per_gpu(data_root) -> dict[str, int]:
    """GPU memory per type from Sailor's `basic_cluster_config.json`."""
    import json
    from pathlib import Path

    doc = json.loads((Path(data_root) / "sailor/sailor/Planner/simulations/configs/basic_cluster_config.json").read_text())
    return {k: v["mem_per_gpu"] for k, v in doc.items() if isinstance(v, dict)}


def vms_of(plans: list[SailorPlan]) -> Counter:
    """The largest multiset of VMs (gpu type, gpus in VM, tp) any one of the plans used."""
    best: Counter = Counter()
    for p in plans:
        used = Counter(r for st in p.stages for r in st.replicas)
        if sum(used.values()) > sum(best.values()):
            best = used
    return best


def _n_slots(data: SailorData, model: str) -> int:
    return data.configs[model]["num_all_layers"]


def _mbs_options(data: SailorData, model: str, vms) -> list[int]:
    sets = [{int(m) for m, by_tp in data.profiles[PROFILE_NAMES[model]][g].items() if str(tp) in by_tp}
            for g, _, tp in vms]
    return sorted(set.intersection(*sets))


def memory_ok(data: SailorData, plan: SailorPlan, mem_per_gpu: dict[str, int]) -> bool:
    info = data.llm_info[PROFILE_NAMES[plan.model]]
    m = max(1, plan.gbs // (plan.mbs * plan.dp))
    for s, st in enumerate(plan.stages):
        for gpu, _, tp in st.replicas:
            layers = [info[str(tp)][str(k)] for k in st.slots]
            need = sum(x["params_bytes"] for x in layers) * ADAM_BYTES_PER_PARAM_BYTE
            need += sum(x["act_mem_bytes"] for x in layers) * plan.mbs * min(len(plan.stages) - s, m)
            if need > mem_per_gpu[gpu]:
                return False
    return True


def _balanced_cuts(data: SailorData, model: str, grid, mbs: int, n: int) -> list[tuple[int, ...]]:
    """Contiguous slot ranges per stage minimising the slowest stage (slowest replica's fwd+bwd)."""
    p = len(grid)
    cost = [[sum(data.slot_times(model, g, mbs, tp, k)[:2]) for k in range(n)]
            for g, _, tp in (max(col, key=lambda r: sum(data.slot_times(model, r[0], mbs, r[2], 1)[:2]))
                             for col in grid)]
    prefix = [[0.0] for _ in range(p)]
    for s in range(p):
        for k in range(n):
            prefix[s].append(prefix[s][-1] + cost[s][k])
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(p + 1)]
    arg = [[0] * (n + 1) for _ in range(p + 1)]
    best[0][0] = 0.0
    for s in range(1, p + 1):
        for j in range(s, n - (p - s) + 1):
            for i in range(s - 1, j):
                v = max(best[s - 1][i], prefix[s - 1][j] - prefix[s - 1][i])
                if v < best[s][j]:
                    best[s][j], arg[s][j] = v, i
    cuts, j = [n], n
    for s in range(p, 0, -1):
        j = arg[s][j]
        cuts.append(j)
    return sorted(cuts)


def _plan(base: SailorPlan, grid, cuts, mbs: int) -> SailorPlan:
    stages = tuple(StagePlan(tuple(range(a, b)), tuple(col)) for col, a, b in zip(grid, cuts[:-1], cuts[1:]))
    return replace(base, name="alloy", stages=stages, mbs=mbs, measured_s=None)


def _grids(vms: Counter, p: int, d: int):
    """Distinct p x d assignments of VMs (stage-major; the d pipelines taken in sorted order)."""
    kinds = sorted(vms)
    seen = set()
    for cells in itertools.product(range(len(kinds)), repeat=p * d):
        use = Counter(cells)
        if any(use[i] > vms[kinds[i]] for i in use):
            continue
        cols = sorted(tuple(cells[s * d + r] for s in range(p)) for r in range(d))
        key = tuple(cols)
        if key in seen:
            continue
        seen.add(key)
        yield [tuple(kinds[cols[r][s]] for r in range(d)) for s in range(p)]


def _refine(data: SailorData, base: SailorPlan, grid, cuts, mbs: int, s: float, mem_per_gpu) -> tuple:
    """Move one cut by one slot while the predicted step time improves."""
    evaluated, improved = 0, True
    while improved:
        improved = False
        for i in range(1, len(cuts) - 1):
            for delta in (-1, 1):
                c = list(cuts)
                c[i] += delta
                if not c[i - 1] < c[i] < c[i + 1]:
                    continue
                cand = _plan(base, grid, c, mbs)
                if not memory_ok(data, cand, mem_per_gpu):
                    continue
                v = sailor_step_s(data, cand)
                evaluated += 1
                if v < s - 1e-12:
                    cuts, s, improved = c, v, True
    return cuts, s, evaluated


def search(data: SailorData, base: SailorPlan, vms: Counter, mem_per_gpu: dict[str, int],
           refine_top: int = REFINE_TOP, mbs_only: tuple[int, ...] | None = None) -> SearchResult:
    """Best plan on `vms` for `base`'s model and global batch, by predicted step time.

    Every (p, d, grid, mbs) is scored with balanced cuts; the `refine_top` best are then hill-climbed.
    """
    t0 = time.perf_counter()
    n = _n_slots(data, base.model)
    total = sum(vms.values())
    scored = []
    for p in range(1, total + 1):
        for d in range(1, total // p + 1):
            for grid in _grids(vms, p, d):
                for mbs in _mbs_options(data, base.model, [r for col in grid for r in col]):
                    if base.gbs % (mbs * d) or (mbs_only and mbs not in mbs_only):
                        continue
                    cuts = _balanced_cuts(data, base.model, grid, mbs, n)
                    plan = _plan(base, grid, cuts, mbs)
                    if memory_ok(data, plan, mem_per_gpu):
                        scored.append((sailor_step_s(data, plan), len(scored), grid, cuts, mbs))
    scored.sort()
    evaluated = len(scored)
    best = None
    for s, _, grid, cuts, mbs in scored[:refine_top]:
        cuts, s, k = _refine(data, base, grid, cuts, mbs, s, mem_per_gpu)
        evaluated += k
        if best is None or s < best[0]:
            best = (s, _plan(base, grid, cuts, mbs))
    return SearchResult(best[1], best[0], time.perf_counter() - t0, evaluated)


def describe(plan: SailorPlan) -> str:
    return f"pp{len(plan.stages)} dp{plan.dp} mbs{plan.mbs} " + " / ".join(
        f"L{st.slots[0]}-{st.slots[-1]}:[{' '.join(g + ('' if tp == vm else f'/tp{tp}') for g, vm, tp in st.replicas)}]"
        for st in plan.stages)
