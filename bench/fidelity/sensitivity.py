"""How far the 70B separate-pipelines check rests on an input the published data does not give.

The 70B separate pipelines put 20 layers on an A100: 32.9 GiB of weights in vLLM's 36 GiB. The KV room
is the small difference left after vLLM's own reserve per GPU, and that reserve is not published for
these runs. Read off the caps file it is 1.0-4.3 GiB depending on the machine type (median 3.0, what the
check uses). `reserve_spread` predicts the total at each value in that range, and finds the reserve at
which the A100 pipeline holds the requests Little's law reads from its measurement.

Nothing here changes a checked prediction; it reports the range it would span over the missing input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.fidelity import helix, kv_caps
from bench.fidelity.validate import (HELIX, HOSTS, ServingSetup, _measured_rows, _placement, published_throughput,
                                     serving_setup, specs)

GIB = 2**30


@dataclass(frozen=True)
class Spread:
    name: str
    varied: str  # which input, over what range
    low: float
    checked: float  # the prediction the check uses
    high: float
    published: float
    note: str = ""

    @property
    def covers(self) -> bool:
        return self.low <= self.published <= self.high


def reserve_spread(root: Path, setup: ServingSetup | None = None, points: int = 14) -> Spread:
    spec = specs(root)["llama70b"]
    setup = setup or serving_setup(root, specs(root))
    places = {t: _placement(root / HELIX / f"layout_llama70b/separate/{t}_solution_file.ini") for t in ("a100", "l4", "t4")}
    vram = kv_caps.vram_bytes(helix.read_machine_profiles(root / HELIX / "config/machine_profiles.ini"))

    def separate(reserve: float) -> dict[str, tuple[float, float]]:
        """sub-cluster -> (tokens/s, requests in flight) of the 70B separate pipelines at this reserve per GPU."""
        at = ServingSetup(setup.invs, setup.budgets, setup.caps, setup.overhead,
                          kv_caps.physical_budgets(setup.budgets, vram, reserve))
        out = {}
        for t, place in places.items():
            p = at.predict("llama70b", spec, t, place, HOSTS[("llama70b", "separate")])
            out[t] = (p.tokens_per_s, p.in_flight)
        return out

    def total(reserve: float) -> float:
        return sum(x for x, _ in separate(reserve).values())

    reserves = kv_caps.reserves_per_gpu(setup.budgets, vram)
    grid = np.linspace(min(reserves.values()), max(reserves.values()), points)
    totals = [total(r) for r in grid]
    median = kv_caps.reserve_per_gpu(setup.budgets, vram)
    checked = total(median)
    rows = {r["subcluster"]: r for r in _measured_rows(root)
            if r["model"] == "llama70b" and r["placement"] == "separate" and r["subcluster"] != "all"}
    little = float(rows["a100"]["decode_tok_s"]) * float(rows["a100"]["avg_decode_latency_s"])
    # The A100 pipeline's requests fall as the reserve grows: bisect for Little's-law count, to 1 MiB.
    lo, hi = min(grid), max(grid)
    while hi - lo > 2**20:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if separate(mid)["a100"][1] > little else (lo, mid)
    published = published_throughput(root)[("llama70b", "separate")]
    note = (f"{grid[0] / GIB:.1f} GiB: {totals[0]:.0f} tok/s, median {median / GIB:.1f} GiB: {checked:.0f}, "
            f"{grid[-1] / GIB:.1f} GiB: {totals[-1]:.0f}; the A100 pipeline holds the {little:.1f} requests Little's law "
            f"reads from its measurement at a reserve of {lo / GIB:.2f} GiB, where the caps file's A100 rows read "
            f"{reserves['A100'] / GIB:.2f} GiB")
    return Spread("offline decode tok/s llama70b separate", f"vLLM reserve per GPU {grid[0] / GIB:.1f}-{grid[-1] / GIB:.1f} GiB",
                  float(min(totals + [checked])), float(checked), float(max(totals + [checked])), published, note)


def run_all(root: Path) -> list[Spread]:
    setup = serving_setup(root, specs(root))
    return [reserve_spread(root, setup)]
