"""The search: which devices form which replicas, in what pipeline order, with which layers and
which share of the batch.

- Layer ranges for one ordered device list: exact dynamic programming (`best_cuts`).
- Batch shares: a DP over replicas and samples, exact for the min-max of any replica times.
- Grouping devices into replicas and ordering them: exhaustive up to EXACT_MAX_DEVICES devices,
  beyond that a fixed family of heuristics (docs/PLANNER.md states what each one covers).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from alloy.plan.timing import (Layout, Problem, Replica, micro_batching, replica_timing, sync_cost,
                               synced_time_s)
from alloy.plan.timing import (quantized_base_here, send_s, stage_compute_s, stage_memory_bytes, transport_of,
                               stage_optimizer_s, stage_overhead_s)

EXACT_MAX_DEVICES = 5  # every grouping and order is tried up to here (958 ordered groupings at 5)
EXACT_MAX_BATCH = 16  # shares water-filled over each share's own best layout up to here
EXACT_MAX_THRESHOLDS = 4096  # bottleneck candidates the pipeline DP tries before thinning to a grid
HEURISTIC_THRESHOLDS = 24
# Largest-optimizer-update caps swept before thinning to a grid: all of them (up to 64) for models
# of up to 16 cut points, where the search is exact, else 4 evenly spaced.
EXACT_MAX_OPTIMIZER_CAPS = 64
EXACT_MAX_CAP_BOUNDS = 17
HEURISTIC_OPTIMIZER_CAPS = 4
CAP_MIN_GAIN = 0.01
OPTIMIZER_RESCORE = 8  # pipeline splits rescored with the optimizer update included
SHORTLIST = 4  # groupings whose micro-batch count is searched in full (heuristic mode)
# Layer boundaries the pipeline DP may cut at. Its tables grow with their square (and the
# threshold sweep with it), so a model deeper than this (the deepest real one has 126 layers) is
# cut every `ceil(L / 128)` layers: 512 layers planned in seconds, not minutes.
MAX_CUT_POINTS = 129


@dataclass
class SearchResult:
    layout: Layout
    step_s: float
    mode: str  # "exact" or "heuristic"
    layouts_scored: int
    notes: list[str] = field(default_factory=list)
    # The best layout of each other device grouping, fastest first (candidates to verify).
    alternatives: list[tuple[float, Layout]] = field(default_factory=list)


class Search:
    def __init__(self, problem: Problem, replicas: int | None = None):
        self.p = problem
        self.replicas = replicas  # pin the number of replicas; None searches it
        L = problem.num_layers
        self.cut_every = max(1, math.ceil(L / (MAX_CUT_POINTS - 1)))
        self.bounds = np.unique(np.r_[np.arange(0, L, self.cut_every), L])  # where a stage may start/stop
        self.start, self.stop = np.meshgrid(self.bounds, self.bounds, indexing="ij")  # (B, B) layer indices
        self.exact = len(problem.devices) <= EXACT_MAX_DEVICES
        self._valid = self.start < self.stop
        self._cuts_cache: dict = {}
        self._rows: dict = {}  # stage-table rows shared by devices with the same speed / position
        self.layouts_scored = 0

    # ---- one pipeline ------------------------------------------------------------------------

    def stage_table(self, order: tuple[int, ...], share: int, micro_batches: int) -> np.ndarray:
        """(stages, B, B): slot time of layers [bounds[i], bounds[j]) at each pipeline position;
        inf = no fit."""
        p, i, j = self.p, self.start, self.stop
        m, mb, mb_max = micro_batching(p, share, micro_batches, len(order))
        how = transport_of(p, order)  # one transport for the whole pipeline, as the runtime sends
        table = np.empty((len(order),) + i.shape)
        for pos, d in enumerate(order):
            nxt = order[pos + 1] if pos + 1 < len(order) else None
            compute_key = ("compute", p.flops[d], p.memory_bandwidth_bytes_per_s[d], mb,
                           id(p.measured[d]) if p.measured and p.measured[d] else None)
            if compute_key not in self._rows:
                with np.errstate(invalid="ignore"):
                    self._rows[compute_key] = stage_compute_s(p, d, i, j, mb)
            memory_key = ("memory", min(len(order) - pos, m), mb_max, share, quantized_base_here(p, d))
            if memory_key not in self._rows:
                with np.errstate(invalid="ignore"):
                    self._rows[memory_key] = stage_memory_bytes(p, i, j, memory_key[1], mb_max, share, d)
            slot = self._rows[compute_key] + stage_overhead_s(p, d, len(order)) + send_s(p, d, nxt, mb, how)
            table[pos] = np.where(self._valid & (self._rows[memory_key] <= p.memory_bytes[d]), slot, np.inf)
        return table

    def best_cuts(self, order: tuple[int, ...], share: int, micro_batches: int):
        """(time_s, cuts) minimising sum(slots) + (m-1) * max(slot) over contiguous splits, or None.

        Exact: the optimum's bottleneck B* is one of the table's values, and for that B the DP
        "least sum of slots with every slot <= B" finds a split at least as good. Every candidate
        B is tried unless there are more than the cap; then a geometric grid of ratio r is used and
        the result is within a factor r of the optimum for this order (r is logged in the notes).
        """
        key = (self._signature(order), share, micro_batches)
        if key in self._cuts_cache:
            return self._cuts_cache[key]
        result = self._solve_cuts(order, share, micro_batches)
        self._cuts_cache[key] = result
        return result

    def _solve_cuts(self, order, share, micro_batches):
        L = len(self.bounds) - 1  # the last boundary's index
        if len(order) > L:
            return None
        m = micro_batching(self.p, share, micro_batches, len(order))[0]
        table = self.stage_table(order, share, micro_batches)
        optimizer = self._optimizer_table(order, table)
        first = self._pipeline_totals(table, optimizer, m, np.array([np.inf]))
        best = self._rescore(order, share, micro_batches, table, optimizer, first)
        if best is None:
            return None
        # The optimizer update (the slowest stage's, after the pipeline) is not a slot time, so
        # the split above may hold a bigger update than needed. Its largest value O is swept like
        # the bottleneck: for each cap O the DP runs on the stages whose update fits under it.
        # Only caps that could still win are tried (least pipeline + O below the best so far);
        # past EXACT_MAX_OPTIMIZER_CAPS of them an even grid is used.
        least = min(t for t, _, _ in first)  # the least pipeline time of any split (the sweep is exact)
        small = self.exact and len(self.bounds) <= EXACT_MAX_CAP_BOUNDS
        # Exact on small tables; on big ones only a gain over CAP_MIN_GAIN is looked for.
        gain = 1e-12 if small else CAP_MIN_GAIN
        finite = optimizer[np.isfinite(optimizer)]
        caps = np.unique(finite[(finite >= _bottleneck(optimizer)) & (least + finite < best[0] * (1 - gain))])
        if len(caps) == 0:
            return best
        most = EXACT_MAX_OPTIMIZER_CAPS if small else HEURISTIC_OPTIMIZER_CAPS
        if len(caps) > most:
            caps = np.linspace(caps[0], caps[-1], most)
        # On big tables the caps share a quarter of the first sweep's bottleneck budget.
        limit = max(HEURISTIC_THRESHOLDS // 4, len(first) // (1 if small else 4 * len(caps)))
        again = self._rescore(order, share, micro_batches, table, optimizer,
                              self._pipeline_totals(table, optimizer, m, caps, limit))
        return again if again is not None and again[0] < best[0] else best

    def _rescore(self, order, share, micro_batches, table, optimizer, candidates):
        """The best of the few best (estimated total, bottleneck, optimizer cap) splits, scored in
        full (each split's real optimizer update and overheads)."""
        best = None
        for total, threshold, cap in sorted(candidates, key=lambda c: c[0])[:OPTIMIZER_RESCORE]:
            if not np.isfinite(total):
                break
            allowed = np.where(optimizer <= cap, table, np.inf)
            cuts = tuple(int(self.bounds[c]) for c in _backtrack(allowed, threshold))
            timing = replica_timing(self.p, order, cuts, share, micro_batches)
            if best is None or timing.time_s < best[0]:
                best = (timing.time_s, cuts)
        return best

    def _optimizer_table(self, order, table):
        """(stages, B, B): the optimizer update of layers [bounds[i], bounds[j]) at each position."""
        with np.errstate(invalid="ignore"):
            rows = [np.broadcast_to(stage_optimizer_s(self.p, d, self.start, self.stop), self.start.shape)
                    for d in order]
        return np.where(np.isfinite(table), np.stack(rows), np.inf)

    def _pipeline_totals(self, table, optimizer, m, caps, limit: int | None = None):
        """(sum(slots) + (m-1) x bottleneck + cap, bottleneck, cap) for each optimizer cap and each
        bottleneck worth trying under it; all in two passes of the least-sum DP."""
        stars = np.array([_bottleneck(table if np.isinf(c) else np.where(optimizer <= c, table, np.inf))
                          for c in caps])
        caps = caps[np.isfinite(stars)]
        stars = stars[np.isfinite(stars)]
        if len(caps) == 0:
            return []
        if m == 1:
            thresholds, owners = np.full(len(caps), np.inf), caps
        else:
            pairs = np.r_[stars, np.full(len(caps), np.inf)]
            sums = _least_sums(table, pairs) if np.all(np.isinf(caps)) else _least_sums(
                table, pairs, optimizer, np.r_[caps, caps])
            most = limit or (EXACT_MAX_THRESHOLDS if self.exact else HEURISTIC_THRESHOLDS)
            thresholds, owners = [], []
            for k, (cap, b_star) in enumerate(zip(caps, stars)):
                # No B above this can win: even the unconstrained least sum plus (m-1)*B is worse.
                b_hi = max(b_star, (sums[k] + (m - 1) * b_star - sums[len(caps) + k]) / (m - 1))
                allowed = table[(optimizer <= cap) & np.isfinite(table)]
                values = np.unique(allowed[(allowed >= b_star) & (allowed <= b_hi)])
                if len(values) > most:
                    values = np.geomspace(b_star, b_hi, most)
                thresholds.append(values)
                owners.append(np.full(len(values), cap))
            thresholds, owners = np.concatenate(thresholds), np.concatenate(owners)
        unmasked = bool(np.all(np.isinf(owners)))  # the first pass: no cap, the cheaper DP
        sums = _least_sums(table, thresholds) if unmasked else _least_sums(table, thresholds, optimizer, owners)
        totals = sums + (m - 1) * np.where(np.isfinite(thresholds), thresholds, 0.0) + np.where(
            np.isfinite(owners), owners, 0.0)
        self.layouts_scored += len(thresholds)
        return list(zip(totals.tolist(), thresholds.tolist(), owners.tolist()))

    def _signature(self, order):
        """Orders on identical hardware get identical answers: key the cache by what the DP reads."""
        p = self.p
        sig = [(p.flops[d], p.memory_bytes[d], p.memory_bandwidth_bytes_per_s[d], p.host_link_bytes_per_s[d],
                id(p.measured[d]) if p.measured and p.measured[d] else None) for d in order]
        links = [(p.link_bytes_per_s[a, b], p.link_latency_s[a, b]) for a, b in zip(order, order[1:])]
        return tuple(sig), tuple(links), transport_of(p, order)

    # ---- one replica group (a set of devices) ------------------------------------------------

    def orders(self, group: tuple[int, ...]) -> list[tuple[int, ...]]:
        if self.exact or len(group) <= 3:
            return list(itertools.permutations(group))
        p = self.p
        by_node_speed = tuple(sorted(group, key=lambda d: (p.devices[d].node, -p.flops[d], d)))
        # 1F1B keeps the most activations on the first stages: roomy devices first.
        by_memory = tuple(sorted(group, key=lambda d: (-p.memory_bytes[d], -p.flops[d], d)))
        by_speed = tuple(sorted(group, key=lambda d: (-p.flops[d], d)))
        # The last stage holds the head: the second-roomiest device there, the rest roomiest first.
        roomy_ends = by_memory[:1] + by_memory[2:] + by_memory[1:2]
        return list(dict.fromkeys([by_node_speed, by_memory, by_speed, roomy_ends]))

    def best_pipeline(self, group, share, micro_batches):
        """(time_s, order, cuts) of the best order of `group` at this share, or None if nothing fits."""
        best = None
        for order in self.orders(group):
            found = self.best_cuts(order, share, micro_batches)
            if found and (best is None or found[0] < best[0]):
                best = (found[0], order, found[1])
        return best

    # ---- replicas and shares -----------------------------------------------------------------

    def assemble(self, groups: list[tuple[int, ...]], micro_batches: int, best_s: float):
        """Best layout with exactly these replica groups, or None (no fit, or cannot beat best_s)."""
        total = self.p.work.batch_size
        if len(groups) > total:
            return None
        sync = sync_cost(self.p, groups)
        if sync.exposed_s >= best_s:
            return None

        def time_of(g, n):
            found = self.best_pipeline(g, n, micro_batches)
            if found is None or not sync.hidden_s:
                return _time(found)
            return synced_time_s(self.p, replica_timing(self.p, found[1], found[2], n, micro_batches), sync)

        if self.exact and total <= EXACT_MAX_BATCH:
            # Each share gets its own best layout, and the shares come from an exact DP over them.
            shares = fill_shares([lambda n, g=g: time_of(g, n) for g in groups], total)
        else:
            shares = self._shares_for_fixed_layouts(groups, micro_batches, sync)
        if shares is None:
            return None
        replicas = []
        for g, n in zip(groups, shares):
            found = self.best_pipeline(g, n, micro_batches)
            if found is None:
                return None
            replicas.append(Replica(found[1], tuple(int(c) for c in found[2]), n))
        step_s = max(time_of(g, n) for g, n in zip(groups, shares)) + sync.exposed_s
        return step_s, Layout(tuple(replicas), micro_batches)

    def _shares_for_fixed_layouts(self, groups, micro_batches, sync):
        """Heuristic for big batches: lay each replica out at a throughput-proportional share,
        water-fill shares over those fixed layouts, then lay out again at the final shares."""
        p = self.p
        speed = [float(sum(p.flops[d] for d in g)) for g in groups]
        shares = largest_remainder(p.work.batch_size, speed)
        if shares is None:
            return None
        layouts = [self.best_pipeline(g, n, micro_batches) for g, n in zip(groups, shares)]
        if any(found is None for found in layouts):
            return None
        time_of = [_memo(lambda n, f=f: synced_time_s(p, replica_timing(p, f[1], f[2], n, micro_batches), sync))
                   for f in layouts]
        return rebalance_shares(time_of, shares)

    # ---- the whole search --------------------------------------------------------------------

    def run(self, micro_batch_choices: tuple[int, ...], keep: int = 0) -> SearchResult | None:
        """The fastest layout; with `keep`, also the best layout of the next `keep` groupings."""
        best: tuple[float, Layout] | None = None
        per_grouping: dict = {}
        groupings = list(self.groupings())
        if not self.exact and len(micro_batch_choices) > 1:
            groupings = self._shortlist(groupings, micro_batch_choices[-1])
        for groups in groupings:
            previous_s = math.inf
            for m in micro_batch_choices:
                found = self.assemble(groups, m, best[0] if best and not keep else math.inf)
                if found is None:
                    continue
                key = tuple(groups)
                if key not in per_grouping or found[0] < per_grouping[key][0]:
                    per_grouping[key] = found
                if best is None or found[0] < best[0]:
                    best = found
                # Heuristic: past the best micro-batch count, more only adds latency and memory.
                if not self.exact and found[0] >= previous_s:
                    break
                previous_s = found[0]
        if best is None:
            return None
        others = sorted((v for v in per_grouping.values() if v[1] != best[1]), key=lambda v: v[0])
        return SearchResult(best[1], best[0], "exact" if self.exact else "heuristic", self.layouts_scored,
                            alternatives=others[:keep])

    def _shortlist(self, groupings, micro_batches: int):
        """Heuristic: rank groupings at the most micro-batches (least memory, smallest bubble)
        and search the micro-batch count only for the best SHORTLIST of them."""
        scored = []
        for groups in groupings:
            found = self.assemble(groups, micro_batches, math.inf)
            scored.append((found[0] if found else math.inf, len(scored), groups))
        scored.sort(key=lambda item: item[:2])
        return [groups for _, _, groups in scored[:SHORTLIST]]

    def groupings(self) -> Iterator[list[tuple[int, ...]]]:
        n = len(self.p.devices)
        if self.exact:
            for size in range(1, n + 1):
                for subset in itertools.combinations(range(n), size):
                    for groups in set_partitions(subset):
                        if self.replicas in (None, len(groups)):
                            yield groups
            return
        yield from heuristic_groupings(self.p, self.replicas)


def heuristic_groupings(p: Problem, replicas: int | None = None) -> Iterator[list[tuple[int, ...]]]:
    """Replica counts 1, 2, 3, 4, 6, 8, 12, ... and the node count; for each, devices dealt by
    speed (snake order, balancing throughput), whole nodes per replica (fast pipeline links),
    and speed tiers (similar devices together). Also the same with the slowest speed class left
    out, one class at a time, so a device that only slows the others can be dropped."""
    L, total = p.num_layers, p.work.batch_size
    speeds = sorted(set(p.flops.tolist()))
    seen = set()
    for dropped in range(len(speeds)):
        members = [d for d in range(len(p.devices)) if p.flops[d] >= speeds[dropped]]
        members.sort(key=lambda d: (-p.flops[d], d))
        nodes = sorted({p.devices[d].node for d in members})
        counts = {1, 2, 3, 4, len(nodes), len(members)} | {2 ** k * c for k in range(1, 12) for c in (3, 4)}
        if replicas is not None:
            counts = {replicas}
        for r in sorted(c for c in counts if c <= min(len(members), total)):
            if math.ceil(len(members) / r) > L:
                continue  # some replica would have more stages than layers
            for groups in (_snake(members, r), _by_node(p, members, r), _tiers(members, r)):
                if groups is None:
                    continue
                key = tuple(sorted(tuple(sorted(g)) for g in groups))
                if key not in seen:
                    seen.add(key)
                    yield [tuple(g) for g in groups]


def _snake(members, r):
    groups = [[] for _ in range(r)]
    for i, d in enumerate(members):
        lap, k = divmod(i, r)
        groups[k if lap % 2 == 0 else r - 1 - k].append(d)
    return groups


def _tiers(members, r):
    size = math.ceil(len(members) / r)
    groups = [members[i:i + size] for i in range(0, len(members), size)]
    return groups if len(groups) == r else None


def _by_node(p: Problem, members, r):
    by_node: dict[str, list[int]] = {}
    for d in members:
        by_node.setdefault(p.devices[d].node, []).append(d)
    if len(by_node) < r or len(by_node) == 1:
        return None
    groups, load = [[] for _ in range(r)], [0.0] * r
    for node_devices in sorted(by_node.values(), key=lambda ds: -sum(p.flops[d] for d in ds)):
        k = load.index(min(load))
        groups[k] += node_devices
        load[k] += sum(p.flops[d] for d in node_devices)
    return groups


def set_partitions(items: tuple[int, ...]) -> Iterator[list[tuple[int, ...]]]:
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest):
        yield [(first,)] + partition
        for k in range(len(partition)):
            yield partition[:k] + [(first,) + partition[k]] + partition[k + 1:]


def fill_shares(time_of: list[Callable[[int], float]], total: int) -> list[int] | None:
    """Integer shares (each >= 1) minimising the largest time_of[r](share[r]); None if none fits.

    Exact for any time functions, by dynamic programming over replicas and samples handed out
    (O(replicas x total^2) calls, each cached by the caller). Replica times need not grow with
    the share: a pipeline runs the largest divisor of its share as micro-batches, so 7 samples
    (one micro-batch of 7) can cost more, or not fit, where 6 (three of 2) do."""
    groups = len(time_of)
    if total < groups:
        return None
    # least[k][s]: the best (largest time, sum of squared times) of the first k replicas holding s
    # samples — the squares break ties between equal bottlenecks towards even shares; take[k][s]:
    # replica k's share in it.
    worst = (math.inf, math.inf)
    least = [[worst] * (total + 1) for _ in range(groups + 1)]
    take = [[0] * (total + 1) for _ in range(groups + 1)]
    least[0][0] = (0.0, 0.0)
    for k in range(1, groups + 1):
        for held in range(k, total - (groups - k) + 1):
            for n in range(1, held - (k - 1) + 1):
                before = least[k - 1][held - n]
                if before[0] > least[k][held][0]:
                    continue
                t = time_of[k - 1](n)
                candidate = (max(before[0], t), before[1] + t * t)
                if candidate < least[k][held]:
                    least[k][held], take[k][held] = candidate, n
    if not math.isfinite(least[groups][total][0]):
        return None
    shares, held = [], total
    for k in range(groups, 0, -1):
        shares.append(take[k][held])
        held -= take[k][held]
    return shares[::-1]


def rebalance_shares(time_of: list[Callable[[int], float]], shares: list[int]) -> list[int] | None:
    """Move samples off the slowest replica while that lowers it, starting from a good guess.

    Exact for non-decreasing times, like fill_shares: if a better split existed, the slowest
    replica would hold fewer samples and some other replica r more, so time_of[r](shares[r]+1)
    would be below the current maximum and a move would still be open."""
    shares = list(shares)
    while True:
        times = [f(n) for f, n in zip(time_of, shares)]
        slow = max(range(len(shares)), key=lambda r: times[r])
        if shares[slow] == 1:
            return shares if math.isfinite(times[slow]) else None
        grown = [time_of[r](shares[r] + 1) if r != slow else math.inf for r in range(len(shares))]
        fast = min(range(len(shares)), key=lambda r: grown[r])
        if not grown[fast] < times[slow]:
            return shares if math.isfinite(times[slow]) else None
        shares[slow] -= 1
        shares[fast] += 1


def _memo(f: Callable[[int], float]) -> Callable[[int], float]:
    cache: dict[int, float] = {}

    def memoised(n: int) -> float:
        if n not in cache:
            cache[n] = f(n)
        return cache[n]
    return memoised


def largest_remainder(total: int, weights: list[float]) -> list[int] | None:
    """Integer shares proportional to weights, each >= 1 (one sample each first, the rest split)."""
    r = len(weights)
    if total < r:
        return None
    rest = total - r
    exact = [rest * w / sum(weights) for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(r), key=lambda k: (-(exact[k] - shares[k]), k))
    for k in by_remainder[: rest - sum(shares)]:
        shares[k] += 1
    return [s + 1 for s in shares]


def _time(found) -> float:
    return math.inf if found is None else found[0]


def _bottleneck(table: np.ndarray) -> float:
    """The least largest slot over all contiguous splits (inf when nothing fits)."""
    L1 = table.shape[1]
    best = np.full(L1, np.inf)
    best[0] = 0.0
    for stage in table:
        best = np.min(np.maximum(best[:, None], stage), axis=0)
    return float(best[-1])


def bottleneck_cuts(costs_s: list[float], speeds: list[float]) -> tuple[int, ...]:
    """Contiguous stages of measured layers over ordered devices, by the pipeline DP's own steps:
    the least largest slot (`_bottleneck`), then the least total time under it (`_backtrack`).
    Layer k takes costs_s[k] on a device of speed 1, stage s runs on a device of speeds[s]; stage
    s holds layers [cuts[s], cuts[s + 1]). Needs at least as many layers as devices."""
    prefix_s = np.r_[0.0, np.cumsum(costs_s)]
    start, stop = np.meshgrid(np.arange(len(prefix_s)), np.arange(len(prefix_s)), indexing="ij")
    work_s = np.where(start < stop, prefix_s[stop] - prefix_s[start], np.inf)  # layers [i, j) or none
    table = work_s[None] / np.asarray(speeds, dtype=float)[:, None, None]  # (stages, L + 1, L + 1)
    return tuple(int(c) for c in _backtrack(table, _bottleneck(table)))


def _least_sums(table: np.ndarray, thresholds: np.ndarray, optimizer: np.ndarray | None = None,
                caps: np.ndarray | None = None) -> np.ndarray:
    """For each threshold B (and optimizer cap O): least sum of slot times over splits with every
    slot <= B (and every stage's optimizer update <= O)."""
    L1 = table.shape[1]
    f = np.full((len(thresholds), L1), np.inf)
    f[:, 0] = 0.0
    for k, stage in enumerate(table):
        fits = stage[None] <= thresholds[:, None, None]
        if caps is not None:
            fits &= optimizer[k][None] <= caps[:, None, None]
        f = np.min(f[:, :, None] + np.where(fits, stage[None], np.inf), axis=1)
    return f[:, -1]


def _backtrack(table: np.ndarray, threshold: float) -> tuple[int, ...]:
    L1 = table.shape[1]
    f = np.full(L1, np.inf)
    f[0] = 0.0
    choices = []
    for stage in table:
        candidates = f[:, None] + np.where(stage <= threshold, stage, np.inf)
        choice = np.argmin(candidates, axis=0)
        f = candidates[choice, np.arange(L1)]
        choices.append(choice)
    cuts, j = [L1 - 1], L1 - 1
    for choice in reversed(choices):
        j = int(choice[j])
        cuts.append(j)
    return tuple(reversed(cuts))
