"""Emulated heterogeneity: a CPU "device" that is a slice of this machine.

A slice is a set of cores (CPU affinity, as `taskset` sets it) and/or a CPU quota (a cgroup v1
`cpu.cfs_quota_us`, which needs root), so worker processes on one small machine genuinely run at
different speeds. Every cgroup made here is named `alloy-<owner pid>-<n>` and removed again: on
leaving the context (also on error), at interpreter exit, and, for owners that were killed
outright, by `cleanup_stale_slices()`, which every new slice runs first.
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

from alloy.devices.discovery import _own_cgroup_dir
from alloy.devices.schema import CpuSlice
from alloy.errors import AlloyError

CGROUP_PREFIX = "alloy-"
# A short period on purpose: a quota slice runs at full speed until its quota is spent, then waits
# out the period. At the default 100 ms a 25 % slice stalls 75 ms at a time, which no real slow
# device does, and every pipeline hop behind it pays that stall; at 10 ms the slice behaves much
# more like a uniformly slower device (measured here: gloo round trips 4.6 ms -> ~2 ms).
CFS_PERIOD_US = 10_000
SLICE_CPU_SHARES = 262_144  # cgroup v1 maximum; the default is 1024
_MIN_QUOTA_US = 1_000  # the kernel refuses a smaller cfs quota
_counter = itertools.count()
_live: dict[Path, int] = {}  # cgroup dir -> pid of the process that must remove it


class EmulationError(AlloyError):
    """A CPU slice that cannot be set up here (no cgroup access, cores not ours, bad quota)."""


def quota_unavailable_reason() -> str | None:
    """Why CPU quotas cannot be emulated here, or None when they can."""
    parent = _own_cgroup_dir("cpu")
    if parent is None or not (parent / "cpu.cfs_quota_us").exists():
        return "no cgroup v1 cpu controller is mounted (quotas need cpu.cfs_quota_us)"
    if not os.access(parent, os.W_OK):
        return f"cannot create cgroups under {parent} (needs root)"
    return None


def slice_period_us(spec: CpuSlice) -> int:
    """The CFS period of a quota slice: CFS_PERIOD_US, lengthened where the quota would fall below
    the kernel's 1 ms minimum (a 5 % slice gets a 20 ms period)."""
    if spec.quota is None:
        return CFS_PERIOD_US
    return max(CFS_PERIOD_US, math.ceil(_MIN_QUOTA_US / spec.quota))


def slice_context(spec: CpuSlice | dict | None):
    """What a worker on an emulated device runs in: its slice (entered for the block), with torch's
    thread count set to what the slice can run (slice_threads); a no-op without a slice. Shared by
    training workers and generation's stage and expert ranks."""
    if spec is None:
        return nullcontext()
    import torch  # planning imports this module and stays torch-free

    spec = CpuSlice.model_validate(spec)
    torch.set_num_threads(slice_threads(spec))
    return cpu_slice(spec)


def slice_threads(spec: CpuSlice) -> int:
    """Threads a worker in the slice should run: no more than its cores, nor its quota rounded up."""
    cores = len(spec.cores) or len(os.sched_getaffinity(0))
    if spec.quota is None:
        return cores
    return max(1, min(cores, math.ceil(spec.quota - 1e-9)))


class SliceGroup:
    """The cgroup (if a quota is asked for) and core set of one slice; processes are added to it."""

    def __init__(self, spec: CpuSlice):
        allowed = os.sched_getaffinity(0)
        if not set(spec.cores) <= allowed:
            raise EmulationError(f"cpu_slice.cores {spec.cores} are not all usable here (allowed: {sorted(allowed)})")
        if spec.quota is not None and spec.quota > (len(spec.cores) or len(allowed)):
            raise EmulationError(f"cpu_slice.quota {spec.quota} exceeds the slice's "
                                 f"{len(spec.cores) or len(allowed)} core(s)")
        self.cpu_slice = spec
        self.path: Path | None = None
        self._old_sigterm = None

    def __enter__(self) -> "SliceGroup":
        if self.cpu_slice.quota is None:
            return self
        reason = quota_unavailable_reason()
        if reason:
            raise EmulationError(f"cpu_slice.quota: {reason}; use cpu_slice.cores alone instead")
        parent = _own_cgroup_dir("cpu")
        cleanup_stale_slices(parent)
        path = parent / f"{CGROUP_PREFIX}{os.getpid()}-{next(_counter)}"
        try:
            path.mkdir()
        except OSError as err:
            raise EmulationError(f"cpu_slice.quota: cannot create cgroup {path} ({err})") from None
        _live[path] = os.getpid()
        try:
            period_us = slice_period_us(self.cpu_slice)
            (path / "cpu.cfs_period_us").write_text(str(period_us))
            quota_us = max(_MIN_QUOTA_US, round(self.cpu_slice.quota * period_us))
            (path / "cpu.cfs_quota_us").write_text(str(quota_us))
            # The quota caps the slice; the top weight makes it *get* that much on a busy machine,
            # so an emulated device runs at its stated speed whatever else runs beside it.
            (path / "cpu.shares").write_text(str(SLICE_CPU_SHARES))
        except OSError as err:
            _remove(path)
            raise EmulationError(f"cpu_slice.quota: cannot set cgroup quota ({err})") from None
        self.path = path
        self._old_sigterm = _exit_cleanly_on_sigterm()
        return self

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            _remove(self.path)
            self.path = None
            if self._old_sigterm is not None:
                signal.signal(signal.SIGTERM, self._old_sigterm)

    def add(self, pid: int) -> None:
        """Put a running process (all its threads) into the slice."""
        if self.path is not None:
            (self.path / "cgroup.procs").write_text(str(pid))
        if self.cpu_slice.cores:
            # sched_setaffinity(pid) moves one thread; a running torch process has a thread pool.
            for tid in _threads(pid):
                try:
                    os.sched_setaffinity(tid, self.cpu_slice.cores)
                except ProcessLookupError:
                    pass  # the thread ended meanwhile

    def preexec(self) -> Callable[[], None]:
        """For `subprocess.Popen(preexec_fn=...)`: the child enters the slice before it execs."""
        procs = None if self.path is None else str(self.path / "cgroup.procs")
        cores = list(self.cpu_slice.cores)

        def enter() -> None:
            if procs is not None:
                with open(procs, "w") as f:
                    f.write(str(os.getpid()))
            if cores:
                os.sched_setaffinity(0, cores)
        return enter


@contextmanager
def cpu_slice(spec: CpuSlice, pid: int | None = None) -> Iterator[SliceGroup]:
    """Run process `pid` (default: this one) inside the slice for the duration of the block."""
    pid = os.getpid() if pid is None else pid
    old_affinity = os.sched_getaffinity(pid)
    with SliceGroup(spec) as group:
        try:
            group.add(pid)
            yield group
        finally:
            for tid in _threads(pid):
                try:
                    os.sched_setaffinity(tid, old_affinity)
                except ProcessLookupError:
                    pass


def cleanup_stale_slices(parent: Path | None = None) -> list[Path]:
    """Remove alloy cgroups whose owner process is gone and which hold no process; return them."""
    parent = parent or _own_cgroup_dir("cpu")
    removed = []
    if parent is None or not parent.is_dir():
        return removed
    for path in parent.glob(f"{CGROUP_PREFIX}*"):
        owner = path.name[len(CGROUP_PREFIX):].split("-")[0]
        if not owner.isdigit() or _alive(int(owner)) or _procs(path):
            continue
        try:
            path.rmdir()
            removed.append(path)
        except OSError:
            pass  # another process got there first, or a task just entered it
    return removed


def _exit_cleanly_on_sigterm():
    """Turn SIGTERM (what torchrun and `kill` send) into SystemExit, so `finally` and atexit run and
    remove the cgroup; returns the handler to restore, or None when someone else already handles it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return None

    def terminate(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    return signal.SIG_DFL


def _remove(path: Path) -> None:
    """Move any process left in `path` back to its parent cgroup, then delete the cgroup."""
    for attempt in range(50):
        for pid in _procs(path):
            try:
                (path.parent / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass  # it exited
        try:
            path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            time.sleep(0.02)  # an exiting task leaves the cgroup a moment after it is reaped
            continue
        _live.pop(path, None)
        return
    # Still busy: stays in `_live`, so interpreter exit tries again; stale cleanup is the last resort.


def _procs(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return [pid]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _remove_own_cgroups() -> None:
    # A forked child inherits `_live` but must not remove its parent's cgroups.
    for path, owner in list(_live.items()):
        if owner == os.getpid():
            _remove(path)
