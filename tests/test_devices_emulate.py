"""Emulated devices (CPU slices: cores and cgroup quotas) and the inventory of a distributed job.

These start real processes: slices are measured from inside them, cgroups are created and must be
gone afterwards, and two gloo ranks on 127.0.0.1 time the link between them.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from alloy.devices import CpuSlice, Inventory, cleanup_stale_slices, cpu_slice, measure_slice, quota_unavailable_reason
from alloy.devices.discovery import _own_cgroup_dir
from alloy.devices.emulate import CFS_PERIOD_US, CGROUP_PREFIX, EmulationError

NO_QUOTA = quota_unavailable_reason()
needs_quota = pytest.mark.skipif(NO_QUOTA is not None, reason=f"CPU quotas unavailable: {NO_QUOTA}")


def _alloy_cgroups() -> set[Path]:
    parent = _own_cgroup_dir("cpu")
    return set(parent.glob(f"{CGROUP_PREFIX}*")) if parent else set()


@pytest.fixture
def no_leftover_cgroups():
    before = _alloy_cgroups()
    yield
    assert _alloy_cgroups() <= before, "a cgroup was left behind"


@needs_quota
def test_half_quota_slice_measures_slower(no_leftover_cgroups):
    # Both children run at once, one thread each on two cores, so a neighbour's load hits both.
    with ThreadPoolExecutor(2) as pool:
        full, half = pool.map(lambda q: measure_slice(CpuSlice(quota=q), budget_s=1.0), (1.0, 0.5))
    assert full.cpu_slice.quota == 1.0 and half.cpu_slice.quota == 0.5 and full.threads == half.threads == 1
    # Measured here: 49 vs 24 GFLOP/s. A 0.8 margin leaves room for a busy machine.
    assert half.matmul_flops["fp32"] < 0.8 * full.matmul_flops["fp32"], (half.matmul_flops, full.matmul_flops)
    assert (full.name, half.name) == ("cpu-q1", "cpu-q0.5")


def test_cores_slice_pins_every_thread_and_restores():
    import torch

    torch.set_num_threads(torch.get_num_threads())  # make sure the thread pool exists
    before = os.sched_getaffinity(0)
    core = max(before)
    with cpu_slice(CpuSlice(cores=[core])) as group:
        assert group.path is None  # cores alone need no cgroup
        for tid in os.listdir("/proc/self/task"):
            assert os.sched_getaffinity(int(tid)) == {core}
    assert os.sched_getaffinity(0) == before


def test_bad_slices_are_refused():
    with pytest.raises(EmulationError, match="cpu_slice.cores"):
        cpu_slice(CpuSlice(cores=[4096])).__enter__()
    with pytest.raises(EmulationError, match="cpu_slice.quota"):
        cpu_slice(CpuSlice(cores=[0], quota=1.5)).__enter__()


@needs_quota
def test_slice_cgroup_is_removed_when_the_block_fails(no_leftover_cgroups):
    own = Path("/proc/self/cgroup").read_text()
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_slice(CpuSlice(quota=1.0)) as group:
            path = group.path
            period_us = int((path / "cpu.cfs_period_us").read_text())
            assert period_us == CFS_PERIOD_US and int((path / "cpu.cfs_quota_us").read_text()) == period_us
            assert str(os.getpid()) in (path / "cgroup.procs").read_text().split()
            raise RuntimeError("boom")
    assert not path.exists()
    assert Path("/proc/self/cgroup").read_text() == own  # back where it started


@needs_quota
def test_a_small_quota_gets_a_longer_period_not_a_bigger_share(no_leftover_cgroups):
    """The kernel refuses a quota under 1 ms: a 5 % slice keeps its 5 % by lengthening the period."""
    with cpu_slice(CpuSlice(quota=0.05)) as group:
        period_us = int((group.path / "cpu.cfs_period_us").read_text())
        quota_us = int((group.path / "cpu.cfs_quota_us").read_text())
    assert period_us > CFS_PERIOD_US and quota_us / period_us == pytest.approx(0.05)


_SELF_SLICED = textwrap.dedent("""
    import sys, time
    from alloy.devices import CpuSlice, cpu_slice
    with cpu_slice(CpuSlice(quota=0.5)) as group:
        print(group.path, flush=True)
        time.sleep(60)
""")


@needs_quota
def test_killed_workers_leave_no_cgroup(no_leftover_cgroups):
    """SIGTERM: the worker removes its own cgroup. SIGKILL: the next slice's stale sweep does."""
    workers = [subprocess.Popen([sys.executable, "-c", _SELF_SLICED], stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    try:
        paths = [Path(w.stdout.readline().strip()) for w in workers]
        assert all(p.is_dir() for p in paths)
        workers[0].send_signal(signal.SIGTERM)
        workers[1].send_signal(signal.SIGKILL)
        assert workers[0].wait(timeout=30) == 128 + signal.SIGTERM
        workers[1].wait(timeout=30)
        assert not paths[0].exists()
        assert paths[1].exists()  # nobody was left to clean up...
        assert paths[1] in cleanup_stale_slices()  # ...until the sweep
        assert not paths[1].exists()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()


@needs_quota
def test_sweep_keeps_cgroups_of_live_owners(no_leftover_cgroups):
    parent = _own_cgroup_dir("cpu")
    ours = parent / f"{CGROUP_PREFIX}{os.getpid()}-999"
    ours.mkdir()
    try:
        assert ours not in cleanup_stale_slices()
        assert ours.is_dir()
    finally:
        ours.rmdir()


_RANK = textwrap.dedent("""
    import datetime, sys
    import torch.distributed as dist
    from alloy.devices import gather_inventory
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    inventory = gather_inventory(budget_s=0.3)
    open(sys.argv[1], "w").write(inventory.to_json())
    dist.destroy_process_group()
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_gather_one_inventory_with_their_link(tmp_path):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               ALLOY_CACHE_DIR=str(tmp_path / "cache"))
    ranks = [subprocess.Popen([sys.executable, "-c", _RANK, str(tmp_path / f"rank{r}.json")],
                              env=dict(env, RANK=str(r)), stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        for rank in ranks:
            assert rank.wait(timeout=120) == 0, rank.stderr.read()
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()
                rank.wait()
    seen = [(tmp_path / f"rank{r}.json").read_text() for r in range(2)]
    assert seen[0] == seen[1]  # every rank holds the same inventory
    inventory = Inventory.parse(seen[0])
    assert [d.name for d in inventory.devices] == ["rank0/cpu", "rank1/cpu"]
    assert {d.node for d in inventory.devices} == {socket.gethostname()}
    assert all(d.measured and d.matmul_flops["fp32"] > 0 for d in inventory.devices)
    (link,) = inventory.links
    assert (link.a, link.b) == ("rank0/cpu", "rank1/cpu")
    assert 0 < link.latency_s < 0.05 and 1e6 < link.bandwidth_bytes_per_s < 1e12
    assert inventory.link("rank1/cpu", "rank0/cpu") == link


def test_a_slice_runs_a_named_probe_inside_it():
    """measure_slice(probe=...) runs a function it only names (here the runtime's layer timing):
    the devices package never builds a model itself."""
    from alloy.runtime.layer_profile import layer_probe
    from alloy.spec import PRESETS, ModelSpec

    spec = ModelSpec.from_hf_config(PRESETS["tiny-llama"])
    device = measure_slice(CpuSlice(cores=[0]), budget_s=0.2, probe=layer_probe(spec, 16, (1, 2)), timeout_s=300)
    (times,) = device.layer_times
    assert times.hidden_size == spec.hidden_size and times.batch == [1.0, 2.0]
    assert all(t > 0 for t in times.layer_s)
