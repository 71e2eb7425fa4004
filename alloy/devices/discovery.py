"""Discovery: every device PyTorch can drive in this process, described but not yet measured.

CPU facts come from Linux itself (/proc/cpuinfo, /proc/meminfo, the process's affinity and
cgroup limits) because those, not the machine's nominal size, bound what a worker can use.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alloy.kernels.cpuinfo import cpu_flags, cpuinfo  # kernels dispatch on the same flags

# CPU features that change which dtypes have a fast matmul path (x86 and Arm names).
MATMUL_ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm",
)
# cgroup v1 reports "no limit" as a huge page-aligned number rather than -1.
_NO_CGROUP_LIMIT_BYTES = 1 << 60


@dataclass(frozen=True)
class FoundDevice:
    """A device as discovery sees it: identity and capacity, no timings."""

    name: str  # torch device string: "cpu", "cuda:0", "mps", "xpu:0"
    kind: str
    model: str
    memory_bytes: int
    free_memory_bytes: int | None = None
    threads: int | None = None  # CPU only: threads this process may run on
    isa_flags: tuple[str, ...] = ()
    compute_capability: str | None = None  # CUDA only, e.g. "8.0"
    facts: dict = field(default_factory=dict)  # extra identity for the cache fingerprint


def discover() -> list[FoundDevice]:
    """All devices usable here: the CPU first, then cuda:N, mps, xpu:N when present."""
    devices = [_cpu()]
    if torch.cuda.is_available():
        devices += [_cuda(i) for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append(_mps())
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [_xpu(i) for i in range(xpu.device_count())]
    return devices


def torch_device(name: str, kind: str | None = None) -> torch.device:
    """The torch device that a plan's or an inventory's device `name` means in this process.

    `kind` is its profile's ("cpu", "cuda", "mps", "xpu"), since a declared device may be called
    anything ("a100-3"); without it the name's prefix is the kind. "cuda:N" is GPU N. Any other
    CUDA name (a bare "cuda", "a100-3") is this process's GPU: in a worker that torchrun started,
    its LOCAL_RANK's (one GPU per local rank); elsewhere cuda:0.
    """
    kind = kind or name.split(":", 1)[0]
    if kind == "cuda":
        index = name.split(":", 1)[1] if name.startswith("cuda:") else os.environ.get("LOCAL_RANK", "0")
        return torch.device(f"cuda:{index}")
    return torch.device(kind)


def _cpu() -> FoundDevice:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    info = cpuinfo()
    total, available = _meminfo()
    limit = _cgroup_memory_limit_bytes()
    if limit is not None:
        total, available = min(total, limit), min(available, limit)
    flags = cpu_flags()
    return FoundDevice(
        name="cpu", kind="cpu",
        model=info.get("model name") or info.get("Hardware") or platform.processor() or platform.machine(),
        memory_bytes=total, free_memory_bytes=available,
        threads=min(len(cores), torch.get_num_threads()),
        isa_flags=tuple(f for f in MATMUL_ISA_FLAGS if f in flags),
        facts={"cores": cores, "cpu_quota": cpu_quota_cores(), "capability": torch.backends.cpu.get_cpu_capability()},
    )


def _cuda(index: int) -> FoundDevice:
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    return FoundDevice(
        name=f"cuda:{index}", kind="cuda", model=props.name, memory_bytes=total, free_memory_bytes=free,
        compute_capability=f"{props.major}.{props.minor}",
        facts={"uuid": str(getattr(props, "uuid", "")), "cuda": torch.version.cuda, "hip": torch.version.hip},
    )


def _mps() -> FoundDevice:
    # MPS shares the host's unified memory; the recommended working set is Metal's own cap.
    total = torch.mps.recommended_max_memory() if hasattr(torch.mps, "recommended_max_memory") else _meminfo()[0]
    return FoundDevice(name="mps", kind="mps", model=platform.processor() or "Apple GPU", memory_bytes=total)


def _xpu(index: int) -> FoundDevice:
    props = torch.xpu.get_device_properties(index)
    return FoundDevice(name=f"xpu:{index}", kind="xpu", model=props.name, memory_bytes=props.total_memory)


def _meminfo() -> tuple[int, int]:
    """(total, available) host memory in bytes."""
    path = Path("/proc/meminfo")
    if path.is_file():
        fields = {}
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            fields[key] = int(value.split()[0]) * 1024  # kB
        return fields["MemTotal"], fields.get("MemAvailable", fields["MemTotal"])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total, total


def _own_cgroup_dir(controller: str) -> Path | None:
    """This process's directory in a cgroup v1 hierarchy, e.g. the `cpu` one (None if absent)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    own = next((ln.split(":", 2)[2] for ln in lines if controller in ln.split(":", 2)[1].split(",")), None)
    if own is None:
        return None
    for mount in mounts:
        pre, _, post = mount.partition(" - ")
        fs_type, _, options = (post.split() + ["", "", ""])[:3]
        if fs_type == "cgroup" and controller in options.split(","):
            root, mount_point = pre.split()[3], pre.split()[4]
            relative = os.path.relpath(own, root) if own.startswith(root) else own.lstrip("/")
            return Path(mount_point) / ("" if relative == "." else relative)
    return None


def cpu_quota_cores() -> float | None:
    """The CPU quota (cgroup v1 cpu.cfs_quota_us / period) this process runs under, in cores."""
    directory = _own_cgroup_dir("cpu")
    try:
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, TypeError):
        return None
    return None if quota_us <= 0 else quota_us / period_us


def _cgroup_memory_limit_bytes() -> int | None:
    directory = _own_cgroup_dir("memory")
    try:
        limit = int((directory / "memory.limit_in_bytes").read_text())
    except (OSError, ValueError, TypeError):
        return None
    return None if limit >= _NO_CGROUP_LIMIT_BYTES else limit
