"""The planner against a brute force over every layout in the same space, on random small clusters.

The space: any subset of the devices, split into data-parallel replicas; each replica an ordered
pipeline over all its devices, every stage at least one layer; integer batch shares >= 1; the
given micro-batch count. The brute force below enumerates all of it on its own (subsets, set
partitions, permutations, layer cut points, share compositions) and shares only the timing
functions (`replica_timing`, `sync_cost`) with the planner. Pure data parallel hides gradient
buckets behind each replica's backward; what a replica's backward cannot cover adds to its time.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from alloy.devices import DeviceProfile, Inventory, Link
from alloy.plan.cost import TRAIN_WORKER_OVERHEAD_BYTES, Workload
from alloy.plan.search import Search
from alloy.plan.timing import build_problem, replica_timing, stage_memory_bytes, step_timing, sync_cost
from alloy.checkpoint import resolve_spec

INSTANCES = 200
MAX_LAYOUTS_PER_SHARE = 2500  # keeps the brute force to about a second on the slowest instance


def partitions(items):
    """All set partitions, by restricted growth strings (independent of the planner's recursion)."""
    n = len(items)

    def grow(prefix, top):
        if len(prefix) == n:
            yield prefix
            return
        for label in range(top + 2):
            yield from grow(prefix + [label], max(top, label))

    for labels in grow([], -1):
        groups = {}
        for item, label in zip(items, labels):
            groups.setdefault(label, []).append(item)
        yield [tuple(g) for g in groups.values()]


def compositions(total, parts):
    for bars in itertools.combinations(range(1, total), parts - 1):
        edges = (0,) + bars + (total,)
        yield [b - a for a, b in zip(edges, edges[1:])]


def brute_force_step_s(problem, micro_batches):
    L, N, D = problem.num_layers, problem.work.batch_size, len(problem.devices)
    group_best = {}

    def best_for(group, share, sync):
        key = (group, share, sync)
        if key not in group_best:
            best = math.inf
            for order in itertools.permutations(group):
                for inner in itertools.combinations(range(1, L), len(order) - 1):
                    timing = replica_timing(problem, order, (0,) + inner + (L,), share, micro_batches)
                    t = timing.time_s
                    if len(order) == 1 and sync.hidden_s:  # the hidden buckets' excess over the backward
                        t += max(0.0, sync.hidden_s - timing.compute_s[0] * (2 / 3) * (1 - sync.first_bucket_fraction))
                    best = min(best, t)
            group_best[key] = best
        return group_best[key]

    best = math.inf
    for size in range(1, D + 1):
        for subset in itertools.combinations(range(D), size):
            for groups in partitions(list(subset)):
                if len(groups) > N:
                    continue
                sync = sync_cost(problem, groups)
                for shares in compositions(N, len(groups)):
                    t = max(best_for(g, n, sync) for g, n in zip(groups, shares)) + sync.exposed_s
                    best = min(best, t)
    return best


def layouts_per_share(num_devices, num_layers):
    return sum(math.perm(num_devices, k) * math.comb(num_layers - 1, k - 1)
               for k in range(1, min(num_devices, num_layers) + 1))


def random_instance(rng: random.Random):
    while True:
        num_devices, num_layers = rng.randint(1, 5), rng.randint(1, 12)
        if layouts_per_share(num_devices, num_layers) <= MAX_LAYOUTS_PER_SHARE:
            break
    task = rng.choice(["train", "train", "infer"])
    spec = resolve_spec("tiny-llama").replace(num_layers=num_layers, tie_embeddings=rng.random() < 0.5)
    work = Workload(task=task, batch_size=rng.randint(1, 6), seq_len=rng.choice([16, 64, 256]),
                    dtype=rng.choice(["fp32", "bf16"]), checkpointing=rng.random() < 0.3, new_tokens=16)
    nodes = ["n0", "n1"]
    # The optimizer update is a max over stages after the pipeline, outside the exact DP (the search
    # rescores the DP's best splits with it: docs/PLANNER.md), so the exactness claim is made without it;
    # the per-micro-batch overhead is inside the DP and is drawn at random.
    devices = [DeviceProfile(name=f"d{i}", kind="cpu", node=rng.choice(nodes), memory_bytes=1 << 40,
                             matmul_flops={"fp32": 10 ** rng.uniform(9, 11), "bf16": 10 ** rng.uniform(9, 11.5)},
                             memory_bandwidth_bytes_per_s=10 ** rng.uniform(9, 11), optimizer_s_per_param=0.0,
                             micro_batch_overhead_s=rng.choice([0.0, 10 ** rng.uniform(-5, -3)]))
               for i in range(num_devices)]
    links = [Link(a=f"d{a}", b=f"d{b}", bandwidth_bytes_per_s=10 ** rng.uniform(7, 10), latency_s=rng.uniform(0, 1e-4))
             for a, b in itertools.combinations(range(num_devices), 2) if rng.random() < 0.5]
    # Memory from "everything fits anywhere" down to "must split": scale by the whole model's need.
    probe = build_problem(spec, Inventory(devices=devices, links=links), work)
    whole = float(stage_memory_bytes(probe, 0, num_layers, min(num_devices, work.batch_size), work.batch_size,
                                     work.batch_size))
    # every training worker holds a fixed runtime overhead whatever its share: scale only the rest
    fixed = TRAIN_WORKER_OVERHEAD_BYTES if task == "train" else 0.0
    devices = [d.model_copy(update={"memory_bytes": max(1, int(fixed + (whole - fixed) * rng.uniform(0.3, 1.3)))})
               for d in devices]
    return build_problem(spec, Inventory(devices=devices, links=links), work), rng.choice([1, 2, 3])


@pytest.mark.slow
def test_planner_matches_brute_force_on_random_instances():
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    compared = infeasible = 0
    for case in range(INSTANCES):
        problem, micro_batches = random_instance(rng)
        expected_s = brute_force_step_s(problem, micro_batches)
        result = Search(problem).run((micro_batches,))
        where = f"seed {seed}, instance {case}"
        if not math.isfinite(expected_s):
            assert result is None, f"{where}: the planner found a layout the brute force could not"
            infeasible += 1
            continue
        assert result is not None, f"{where}: brute force found {expected_s} s, the planner nothing"
        # The reported time is the timing model's time for the returned layout...
        assert result.step_s == pytest.approx(step_timing(problem, result.layout).step_s, rel=1e-9), where
        # ...and it is within 1% of the best in the space (and, being in the space, not below it).
        assert result.step_s <= expected_s * 1.01, f"{where}: {result.step_s} vs brute force {expected_s}"
        assert result.step_s >= expected_s * (1 - 1e-9), f"{where}: planner beat the brute force"
        compared += 1
    assert compared >= 0.7 * INSTANCES, f"only {compared} feasible instances (seed {seed})"
