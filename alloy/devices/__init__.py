"""Devices: what each one can measurably do (profiles), and the links between them.

`discover()` lists the devices here; `profile()` measures them (cached by hardware
fingerprint); `Inventory.load()` reads a declared cluster; `gather_inventory()` builds one
inventory across the ranks of a torch.distributed job; `cpu_slice()` emulates a slower device;
`torch_device()` is the torch device a plan's device name means in this process.

The schema is plain pydantic; everything that measures imports torch, and only on first use,
so planning from declared files stays torch-free.
"""

from __future__ import annotations

import importlib

from alloy.devices.schema import SCHEMA_VERSION, CpuSlice, DeviceProfile, Inventory, Link, LinkSpec

_LAZY = {
    "FoundDevice": "alloy.devices.discovery",
    "discover": "alloy.devices.discovery",
    "torch_device": "alloy.devices.discovery",
    "EmulationError": "alloy.devices.emulate",
    "cleanup_stale_slices": "alloy.devices.emulate",
    "cpu_slice": "alloy.devices.emulate",
    "quota_unavailable_reason": "alloy.devices.emulate",
    "gather_inventory": "alloy.devices.links",
    "profile": "alloy.devices.local",
    "DeviceError": "alloy.devices.measure",
    "measure_slice": "alloy.devices.slice_worker",
}

__all__ = ["SCHEMA_VERSION", "CpuSlice", "DeviceProfile", "Inventory", "Link", "LinkSpec", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alloy.devices' has no attribute {name!r}")
