"""`alloy demo`: the whole pipeline on this machine, with nothing but the install.

1. measure the devices here; 2. cut the machine into emulated devices of different speed
(CPU quotas as root, else core sets) and measure each; 3. plan a small Llama-spec model over
them; 4. train it on Python's own standard library sources across the planned workers;
5. fuse the shards into a Hugging Face model; 6. generate a sample; 7. report.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

DEMO_STEPS = 150


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="the demo's own directory, replaced on each run "
                                                          "(default: runs/demo)")
    parser.add_argument("--steps", type=int, default=DEMO_STEPS)
    parser.add_argument("--seed", type=int, default=0)


def emulated_devices(console: Console, spec, seq_len: int, batch_size: int):
    """Two workers of unequal speed carved out of this machine, each measured from inside —
    its matmul rate and what this model's layers really cost there."""
    from alloy.devices import CpuSlice, Inventory, measure_slice, quota_unavailable_reason
    from alloy.runtime.layer_profile import layer_probe

    cores = sorted(os.sched_getaffinity(0))
    if quota_unavailable_reason() is None:
        slices = [CpuSlice(quota=1.0), CpuSlice(quota=0.5)]  # one full core and half of one
        how = "CPU quotas 100% and 50% of a core (cgroup v1)"
    elif len(cores) >= 3:
        slices = [CpuSlice(cores=cores[:2]), CpuSlice(cores=cores[2:3])]
        how = f"core sets {cores[:2]} and {cores[2:3]}"
    else:
        slices = [CpuSlice(cores=cores[:1]), CpuSlice(cores=cores[1:2] or cores[:1])]
        how = f"one core each ({quota_unavailable_reason()})"
    batches = tuple(sorted({1, 2, 4, batch_size}))
    probe = layer_probe(spec, seq_len, batches)
    devices = [measure_slice(s, name=f"worker{i}", budget_s=1.0, probe=probe, timeout_s=300)
               for i, s in enumerate(slices)]
    console.print(f"emulated devices: {how}")
    return Inventory(name="demo", devices=devices)


def run(args) -> int:
    from alloy.devices import profile
    from alloy.train.config import load_config
    from alloy.train.run import train

    console = Console(stderr=False)
    started = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)  # the demo's own output from an earlier run
    out.mkdir(parents=True)

    console.rule("[bold]1. devices")
    local = profile()
    for d in local.devices:
        rates = ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in d.matmul_flops.items())
        console.print(f"{d.name}: {d.model}, {rates}, memory bandwidth {d.memory_bandwidth_bytes_per_s / 1e9:.1f} GB/s")
    from alloy.checkpoint import resolve_spec

    inventory = emulated_devices(console, resolve_spec("tiny-llama"), seq_len=128, batch_size=8)
    for d in inventory.devices:
        console.print(f"  {d.name}: {d.matmul_flops['fp32'] / 1e9:.1f} GFLOP/s fp32")
    devices_file = out / "devices.json"
    inventory.save(devices_file)

    console.rule("[bold]2-4. plan and train")
    config = load_config(None, [
        "model=tiny-llama", "data.path=stdlib", "data.max_bytes=3000000", f"devices={devices_file}",
        "batch_size=8", "seq_len=128", f"steps={args.steps}", "eval_every=50", "optimizer.lr=3e-3",
        "schedule.warmup_steps=15", f"checkpoint.every={args.steps}", f"out_dir={out / 'run'}", f"seed={args.seed}",
    ])
    from alloy.cli.train import _summary, progress_callback

    with progress_callback(console, config.steps) as on_line:
        result = train(config, progress=on_line, log=console.print)

    console.rule("[bold]5-6. fused model and a sample")
    sample = _sample(result.final_dir)
    console.print(f"prompt 'def ' ->\n[cyan]def {sample}[/cyan]")

    _summary(console, result)
    table = Table(show_header=False, title="demo")
    table.add_row("plan", _plan_line(result.plan_path))
    table.add_row("devices", str(devices_file))
    table.add_row("total time", f"{time.perf_counter() - started:.0f} s")
    console.print(table)
    return 0


def _plan_line(path: Path) -> str:
    from alloy.plan import Plan

    plan = Plan.load(path)
    parts = []
    for replica in plan.replicas:
        stages = " -> ".join(f"{s.device} layers {s.layers[0]}-{s.layers[1] - 1}" for s in replica.stages)
        parts.append(f"replica {replica.index} ({replica.batch_share} samples): {stages}")
    return "; ".join(parts)


def _sample(final_dir: Path) -> str:
    import alloy
    from alloy.infer.generate import generate
    from alloy.infer.sampling import Sampling

    model = alloy.load(final_dir)
    prompt = model.tokenizer.encode("def ").ids
    (out,) = generate(model, [prompt], max_new_tokens=48, sampling=Sampling(temperature=0.8, top_k=40, seed=0),
                      tokenizer=model.tokenizer)
    return out.text
