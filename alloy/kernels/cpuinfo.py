"""What Linux says this CPU is: the one reader of /proc/cpuinfo. The kernels dispatch on its ISA
flags; the devices profile reports them (alloy.devices.discovery), so both see the same CPU."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """Every ISA flag Linux reports for this CPU (x86 `flags`, ARM `Features`); the profile keeps
    the matmul ones, the kernels dispatch on all of them."""
    info = cpuinfo()
    return frozenset(info.get("flags", info.get("Features", "")).split())


def cpuinfo() -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo (all cores of a VM or socket agree)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    info: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if info:
                break
            continue
        info.setdefault(key.strip(), value.strip())
    return info
