"""One inventory for a torch.distributed job: every rank's device plus the links between ranks.

Each rank measures its own device in turn (so ranks sharing a machine do not slow each other's
timings), the profiles are exchanged as JSON bytes in tensors (never pickled objects), and every
pair of ranks times a ping-pong over the job's own backend — gloo through the host network stack,
NCCL between GPUs — giving latency and bandwidth for each pair.
"""

from __future__ import annotations

import socket
import statistics
import time

import torch
import torch.distributed as dist

from alloy.devices.local import profile
from alloy.devices.measure import synchronize
from alloy.devices.schema import DeviceProfile, Inventory, Link

LATENCY_BYTES = 4
BANDWIDTH_BYTES = 16 << 20


def rank_device(group=None) -> str:
    """The device a rank computes on: its current GPU under NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def gather_inventory(local: DeviceProfile | None = None, *, name: str = "job", group=None,
                     links: bool = True, budget_s: float | None = None, reps: int = 20) -> Inventory:
    """Collective: every rank calls it and gets the same inventory (devices named `rank<r>/<device>`).

    `local` is this rank's device profile; by default it is measured (or read from the cache).
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    comm_device = torch.device(rank_device(group))  # NCCL moves only GPU tensors; gloo moves CPU ones
    if local is None:
        for turn in range(world):  # one rank measures at a time
            if turn == rank:
                local = profile([rank_device(group)], budget_s=budget_s).devices[0]
            dist.barrier(group)
    node = socket.gethostname() if local.node == "local" else local.node
    mine = local.model_copy(update={"name": f"rank{rank}/{local.name}", "node": node})
    devices = [DeviceProfile.model_validate_json(doc) for doc in _all_gather_text(mine.model_dump_json(), comm_device, group)]
    measured = measure_links([d.name for d in devices], comm_device, group, reps) if links and world > 1 else []
    return Inventory(name=name, devices=devices, links=measured)


def measure_links(names: list[str], comm_device: torch.device, group=None, reps: int = 20) -> list[Link]:
    """Collective: latency and bandwidth of every pair of ranks, by ping-pong, one pair at a time."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    pairs = [(a, b) for a in range(world) for b in range(a + 1, world)]
    # (latency_s, bandwidth_bytes_per_s) per pair; filled by the pair's first rank, then summed.
    results = torch.zeros(len(pairs), 2, dtype=torch.float64, device=comm_device)
    small = torch.zeros(LATENCY_BYTES // 4, dtype=torch.float32, device=comm_device)
    large = torch.zeros(BANDWIDTH_BYTES // 4, dtype=torch.float32, device=comm_device)
    for index, (a, b) in enumerate(pairs):
        if rank in (a, b):
            peer = _global(group, b if rank == a else a)
            latency_s = _ping_pong_s(small, peer, rank == a, comm_device, group, reps) / 2
            one_way_s = _ping_pong_s(large, peer, rank == a, comm_device, group, max(3, reps // 3)) / 2
            if rank == a:
                results[index, 0] = latency_s
                results[index, 1] = BANDWIDTH_BYTES / one_way_s
        dist.barrier(group)  # pairs are timed alone, not while other pairs share the network
    dist.all_reduce(results, group=group)
    return [Link(a=names[a], b=names[b], latency_s=float(results[i, 0]), bandwidth_bytes_per_s=float(results[i, 1]))
            for i, (a, b) in enumerate(pairs)]


def _ping_pong_s(tensor: torch.Tensor, peer: int, leader: bool, device: torch.device, group, reps: int) -> float:
    """Median round-trip seconds of `tensor` to `peer` and back (after one warm-up round trip)."""
    samples_s = []
    for rep in range(reps + 1):
        synchronize(device)
        start = time.perf_counter()
        if leader:
            dist.send(tensor, peer, group=group)
            dist.recv(tensor, peer, group=group)
        else:
            dist.recv(tensor, peer, group=group)
            dist.send(tensor, peer, group=group)
        synchronize(device)
        if rep:
            samples_s.append(time.perf_counter() - start)
    return statistics.median(samples_s)


def _all_gather_text(text: str, device: torch.device, group) -> list[str]:
    """Every rank's `text`, in rank order, moved as UTF-8 bytes in padded uint8 tensors."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device), group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    chunks = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(chunks, padded, group=group)
    return [bytes(c[: int(s.item())].cpu().tolist()).decode() for c, s in zip(chunks, sizes)]


def _global(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)
