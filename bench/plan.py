"""Planner runtime on declared heterogeneous clusters of 8, 64 and 256 devices.

Run: python -m bench plan  (or python -m bench.plan --table [--repeat N] for the table alone)
Targets (issue #4): 8 devices < 0.2 s, 64 < 2 s, 256 < 20 s. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
import json
import time
from pathlib import Path

from alloy.devices import DeviceProfile, Inventory, LinkSpec
from alloy.errors import PlanError
from alloy.plan import Workload, fast_dtype, make_plan
from alloy.checkpoint import resolve_spec

# Datasheet-ish sustained rates (about 70% of peak): name -> (bf16 FLOP/s, memory bytes, bytes/s)
KINDS = {
    "a100": (220e12, 40 * 2**30, 1.5e12),
    "l4": (85e12, 24 * 2**30, 0.3e12),
    "t4": (45e12, 16 * 2**30, 0.3e12),
}


def cluster(num_devices: int) -> Inventory:
    """Helix-like mix (1 A100 : 2 L4 : 3 T4 by count), four devices per node."""
    mix = ["a100", "l4", "l4", "t4", "t4", "t4"]
    devices = []
    for i in range(num_devices):
        kind = mix[i % len(mix)]
        flops, memory, bandwidth = KINDS[kind]
        devices.append(DeviceProfile(name=f"{kind}-{i}", kind="cuda", node=f"node{i // 4}", memory_bytes=memory,
                                     matmul_flops={"bf16": flops}, memory_bandwidth_bytes_per_s=bandwidth))
    return Inventory(name=f"bench-{num_devices}", devices=devices,
                     intra_node_link=LinkSpec(bandwidth_bytes_per_s=16e9, latency_s=10e-6),
                     inter_node_link=LinkSpec(bandwidth_bytes_per_s=3.1e9, latency_s=50e-6))


CASES = [  # devices, model, batch size
    (8, "llama-3.1-8b", 64),
    (64, "llama-3.1-8b", 512),
    (256, "llama-3.1-70b", 2048),
]


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "clusters"
EXAMPLE_WORK = dict(model="llama-3.2-1b", batch_size=16, seq_len=512)


def measure(quick: bool) -> dict:
    """Planner seconds per cluster size, and the predicted gain over each baseline on the examples."""
    out: dict = {}
    for num_devices, model, batch in CASES[:2] if quick else CASES:
        spec, inventory = resolve_spec(model), cluster(num_devices)
        work = Workload(task="train", batch_size=batch, seq_len=4096, checkpointing=True)
        started = time.perf_counter()
        make_plan(spec, inventory, work)
        out[f"planner_s_{num_devices}"] = time.perf_counter() - started
    spec = resolve_spec(EXAMPLE_WORK["model"])
    work = Workload(task="train", batch_size=EXAMPLE_WORK["batch_size"], seq_len=EXAMPLE_WORK["seq_len"],
                    checkpointing=True)
    for path in sorted(EXAMPLES.glob("*.json")):
        inventory = Inventory.load(path)
        try:
            plan = make_plan(spec, inventory, replace(work, dtype=fast_dtype(inventory)))
        except PlanError:
            continue  # the example model does not fit this cluster (the emulated 2-core one)
        for base in plan.baselines:
            if base.speedup:
                out[f"gain_{path.stem}_vs_{base.name.replace(' ', '_')}"] = base.speedup
    return out


def variants(quick: bool) -> dict[str, list[str]]:
    return {"alloy": ["--quick"] if quick else []}


PAIRS: list = []  # no baseline process: the baselines are predictions inside each plan


def headline(summary: dict, machine_flops: dict) -> dict:
    return {k: v["median"] for k, v in summary["figures"]["alloy"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--table", action="store_true", help="print the human table instead of one JSON line")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.table:
        print(json.dumps(measure(args.quick)))
        return
    print(f"{'devices':>7}  {'model':<14} {'batch':>5}  {'plan s':>7}  {'mode':<9} {'replicas':>8}  "
          f"{'step s':>8}  best baseline speedup")
    for num_devices, model, batch in CASES:
        spec, inventory = resolve_spec(model), cluster(num_devices)
        work = Workload(task="train", batch_size=batch, seq_len=4096, checkpointing=True)
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            plan = make_plan(spec, inventory, work)
            times.append(time.perf_counter() - started)
        speedups = [b.speedup for b in plan.baselines if b.speedup]
        best = f"{min(speedups):.2f}x" if speedups else "(no baseline fits)"
        print(f"{num_devices:>7}  {model:<14} {batch:>5}  {min(times):>7.3f}  {plan.search.mode:<9} "
              f"{len(plan.replicas):>8}  {plan.predicted.step_s:>8.2f}  {best}")


if __name__ == "__main__":
    main()
