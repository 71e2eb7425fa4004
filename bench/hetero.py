"""Heterogeneous training efficiency: three CPU workers emulated at 100/50/25% of a core.

Variants (each one torchrun job over the same slices, same model, same global batch):
  alloy       the planner's layout from the slices' measured profiles
  equal       what DDP does: every worker a replica with an equal batch share
  solo-<dev>  one worker alone, for the solo-sum ceiling
Headline: efficiency_vs_solo_sum = alloy / sum(solo), gain_vs_equal_split = alloy / equal,
predicted_step_error = |measured - predicted| / measured for Alloy's plan.
Run one measurement: python -m bench.hetero --variant alloy [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from alloy.devices import CpuSlice, Inventory, LinkSpec
from alloy.spec import ModelSpec

QUOTAS = (1.0, 0.5, 0.25)
RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # hidden, layers, heads, kv heads, ffn, vocab, global batch, seq, steps
    "quick": (128, 4, 4, 2, 352, 2048, 7, 64, 4),
    "full": (256, 8, 8, 4, 688, 4096, 28, 128, 5),
}


def spec_for(size: str) -> ModelSpec:
    h, layers, heads, kv, ffn, vocab, _, _, _ = SIZES[size]
    return ModelSpec(family="llama", vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=h // heads, intermediate_size=ffn, max_seq_len=1024,
                     tie_embeddings=True)


def slices_inventory(size: str, refresh: bool = False) -> Inventory:
    """The three slices, each timed from inside itself: matmul rate, memory bandwidth, and this
    benchmark model's per-layer forward+backward times (cached: measuring takes a minute)."""
    cache = RESULTS / f"hetero-slices-{size}.json"
    if cache.is_file() and not refresh:
        return Inventory.load(cache)
    from alloy.devices import measure_slice

    spec, (*_, batch, seq, _) = spec_for(size), SIZES[size]
    devices = [measure_slice(CpuSlice(quota=q), name=f"cpu-q{q:g}", budget_s=2.0,
                             layers_of=(spec, seq, (1, 2, 4, 8, batch)), timeout_s=600) for q in QUOTAS]
    link = measure_slice_link(spec_for(size).num_params() * 4)
    inventory = Inventory(name="hetero-slices", devices=devices, intra_node_link=link)
    inventory.save(cache)
    return inventory


def measure_slice_link(nbytes: int) -> LinkSpec:
    """The slices' gloo all-reduce, timed with each process in its slice: on one machine the
    "link" is loopback plus the reduction arithmetic, paced by the slowest slice's CPU share."""
    import torch.multiprocessing as mp

    from alloy.runtime.launch import free_port

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_link_worker, args=(free_port(), nbytes, out), nprocs=len(QUOTAS), start_method="spawn")
        seconds = float(Path(out, "allreduce_s").read_text())
    n = len(QUOTAS)
    # Invert the planner's ring formula (2 (n-1)/n bytes / bandwidth) so it predicts what was seen.
    return LinkSpec(bandwidth_bytes_per_s=2 * (n - 1) / n * nbytes / seconds, latency_s=0.0)


def _link_worker(rank: int, port: int, nbytes: int, out: str) -> None:
    import statistics
    import time
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from alloy.devices.emulate import cpu_slice

    torch.set_num_threads(1)
    with cpu_slice(CpuSlice(quota=QUOTAS[rank])):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(QUOTAS),
                                timeout=timedelta(seconds=120))
        tensor = torch.ones(nbytes // 4)
        dist.all_reduce(tensor)  # warm-up: connections, buffers
        samples = []
        for _ in range(3):
            dist.barrier()
            started = time.perf_counter()
            dist.all_reduce(tensor)
            samples.append(time.perf_counter() - started)
        if rank == 0:
            Path(out, "allreduce_s").write_text(str(statistics.median(samples)))
        dist.destroy_process_group()


def measure(variant: str, size: str) -> dict:
    from alloy.plan import Workload, make_plan
    from alloy.runtime import RunLayout, Stage, job_document, run, run_job

    spec = spec_for(size)
    *_, batch, seq, steps = SIZES[size]
    inventory = slices_inventory(size)
    devices = {d.name: d.model_dump() for d in inventory.devices}
    out_dir = tempfile.mkdtemp(prefix=f"hetero-{variant}-")
    whole = lambda name: (Stage(name, 0, spec.num_layers, True, True),)  # noqa: E731
    if variant == "alloy":
        plan = make_plan(spec, inventory, Workload("train", batch, seq, dtype="fp32"))
        report = run(plan, steps=steps, out_dir=out_dir, timeout_s=900)
        layout = RunLayout.from_plan(plan)
    else:
        if variant == "equal":
            names = [d.name for d in inventory.devices]
            shares = [batch // len(names) + (i < batch % len(names)) for i in range(len(names))]
            layout = RunLayout(tuple(whole(n) for n in names), tuple(shares), (1,) * len(names))
        else:
            layout = RunLayout((whole(variant.removeprefix("solo-")),), (batch,), (1,))
        job = job_document(spec, layout, steps=steps, seq_len=seq, out_dir=out_dir, devices=devices, timeout_s=900)
        report = run_job(job, timeout_s=900)
    return {
        "tokens_per_s": report.tokens_per_s,
        "measured_step_s": report.measured_step_s,
        "predicted_step_s": report.predicted_step_s or 0.0,
        "prediction_error": report.prediction_error if report.prediction_error is not None else 0.0,
        "layout": layout.to_dict(),
    }


def variants(quick: bool) -> dict[str, list[str]]:
    size = ["--quick"] if quick else []
    slices_inventory("quick" if quick else "full")  # measure once, before the timed runs
    names = ["alloy", "equal"] + [f"solo-cpu-q{q:g}" for q in QUOTAS]
    return {name: ["--variant", name, *size] for name in names}


PAIRS = [("alloy", "equal", "tokens_per_s")]


def headline(summary: dict, machine_flops: dict) -> dict:
    fig = summary["figures"]
    alloy = fig["alloy"]["tokens_per_s"]["median"]
    solo_sum = sum(fig[f"solo-cpu-q{q:g}"]["tokens_per_s"]["median"] for q in QUOTAS)
    return {
        "alloy_tokens_per_s": alloy,
        "baseline_tokens_per_s": fig["equal"]["tokens_per_s"]["median"],
        "solo_sum_tokens_per_s": solo_sum,
        "efficiency_vs_solo_sum": alloy / solo_sum,
        "gain_vs_equal_split": summary["ratios"]["alloy/equal:tokens_per_s"]["median"],
        "predicted_step_error": fig["alloy"]["prediction_error"]["median"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.variant, "quick" if args.quick else "full")))


if __name__ == "__main__":
    main()
