"""`alloy devices`: this machine's devices, measured (cached), or a declared cluster file."""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from alloy.devices import DeviceProfile, Inventory, profile
from alloy.devices.local import cache_dir

DTYPE_ORDER = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8")


def add_arguments(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print the inventory as JSON")
    parser.add_argument("--refresh", action="store_true", help="re-measure instead of using the cache")
    parser.add_argument("--declare", metavar="FILE", help="validate and show a declared cluster file instead")
    parser.add_argument("--device", action="append", metavar="NAME",
                        help="measure only this device (cpu, cuda:0, ...); repeatable")
    parser.add_argument("--budget-s", type=float, metavar="S", help="seconds of measuring per device")


def run(args) -> int:
    if args.declare:
        inventory = Inventory.load(args.declare)
        caption = f"declared in {args.declare}"
    else:
        start = time.perf_counter()
        inventory = profile(args.device, refresh=args.refresh, budget_s=args.budget_s)
        took_s = time.perf_counter() - start
        # A cache hit returns in far less time than the measurements it holds took.
        measured = took_s >= 0.5 * sum(d.measure_s or 0 for d in inventory.devices)
        caption = (f"fingerprint {inventory.fingerprint}, cached in {cache_dir()}; "
                   f"this run took {took_s:.1f} s ({'measured' if measured else 'from cache'})")
    if args.json:
        print(inventory.to_json(), end="")
        return 0
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # piped output: rich would otherwise squeeze to 80 columns
    console.print(device_table(inventory, caption))
    if inventory.links:
        console.print(link_table(inventory))
    return 0


def device_table(inventory: Inventory, caption: str = "") -> Table:
    dtypes = {d for dev in inventory.devices for d in (*dev.matmul_flops, *dev.slow_dtypes)}
    dtypes = [d for d in DTYPE_ORDER if d in dtypes]
    table = Table(title=f"{inventory.name}: {len(inventory.devices)} device(s)", caption=caption)
    for column in ("device", "kind", "model", "memory GiB (free)"):
        table.add_column(column)
    for dtype in dtypes:
        table.add_column(f"{dtype} TFLOP/s", justify="right", no_wrap=True)
    table.add_column("mem GB/s", justify="right", no_wrap=True)
    table.add_column("host link GB/s", justify="right", no_wrap=True)
    table.add_column("notes", overflow="fold")
    for dev in inventory.devices:
        memory = f"{dev.memory_bytes / 2**30:.1f}"
        if dev.free_memory_bytes is not None:
            memory += f" ({dev.free_memory_bytes / 2**30:.1f})"
        rates = [f"{dev.matmul_flops[d] / 1e12:.3g}" if d in dev.matmul_flops else ("slow" if d in dev.slow_dtypes else "-")
                 for d in dtypes]
        host = "-" if dev.host_link_bytes_per_s is None else f"{dev.host_link_bytes_per_s / 1e9:.3g}"
        table.add_row(dev.name, dev.kind, dev.model, memory, *rates,
                      f"{dev.memory_bandwidth_bytes_per_s / 1e9:.3g}", host, _notes(dev))
    return table


def link_table(inventory: Inventory) -> Table:
    table = Table(title="links")
    for column in ("a", "b", "GB/s", "latency us"):
        table.add_column(column, justify="right" if column[0] in "Gl" else "left")
    for link in inventory.links:
        table.add_row(link.a, link.b, f"{link.bandwidth_bytes_per_s / 1e9:.3g}", f"{link.latency_s * 1e6:.1f}")
    return table


def _notes(dev: DeviceProfile) -> str:
    notes = [f"measured in {dev.measure_s:.1f} s" if dev.measured and dev.measure_s else
             ("measured" if dev.measured else "declared")]
    if dev.node != "local":
        notes.append(f"node {dev.node}")
    if dev.compute_capability:
        notes.append(f"sm {dev.compute_capability}")
    if dev.threads:
        notes.append(f"{dev.threads} thread{'s' if dev.threads > 1 else ''}")
    if dev.cpu_slice:
        cores = f"cores {','.join(map(str, dev.cpu_slice.cores))} " if dev.cpu_slice.cores else ""
        quota = f"quota {dev.cpu_slice.quota:g}" if dev.cpu_slice.quota else ""
        notes.append(f"slice {cores}{quota}".strip())
    if dev.slow_dtypes:
        notes.append(f"{'/'.join(dev.slow_dtypes)}: no fast path")
    return "; ".join(notes)
