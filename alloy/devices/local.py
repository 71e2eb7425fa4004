"""Profile this machine's devices, cached by a hardware fingerprint.

Measuring takes seconds, so the inventory is kept under `$ALLOY_CACHE_DIR/devices/` (default
`~/.cache/alloy/devices/`), keyed by everything that changes the figures: CPU model, the cores
and CPU quota this process may use, torch's version and threads, and each accelerator's identity.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch

from alloy.devices.discovery import FoundDevice, discover
from alloy.devices.measure import DeviceError, measure
from alloy.devices.schema import Inventory
from alloy.errors import ConfigError


def cache_dir() -> Path:
    root = os.environ.get("ALLOY_CACHE_DIR") or Path.home() / ".cache" / "alloy"
    return Path(root) / "devices"


# Bumped when what `measure` measures changes, so profiles cached by an older method are re-measured
# (2: CPU memory bandwidth is a streaming read rate, no longer a copy rate).
METHOD_VERSION = 2


def fingerprint(found: list[FoundDevice]) -> str:
    """A short stable hash of the hardware and software that determine measured rates."""
    identity = {
        "method": METHOD_VERSION, "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "devices": [[d.name, d.model, d.memory_bytes, d.compute_capability, d.isa_flags, d.facts] for d in found],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def profile(devices: list[str] | None = None, *, refresh: bool = False, budget_s: float | None = None,
            name: str = "local") -> Inventory:
    """Measured inventory of this machine's devices (all, or the named ones), from cache if fresh.

    `budget_s` is the time allowed per device; `refresh` ignores the cache and re-measures.
    """
    if budget_s is not None and not budget_s > 0:
        raise ConfigError(f"budget_s must be > 0 seconds, got {budget_s}")
    found = discover()
    if devices is not None:
        known = {d.name for d in found}
        missing = [n for n in devices if n not in known]
        if missing:
            raise DeviceError(f"no device {', '.join(missing)} here; found {', '.join(sorted(known))}")
        found = [d for d in found if d.name in devices]
    key = fingerprint(found)
    path = cache_dir() / f"{key}.json"
    if not refresh and path.is_file():
        cached = _load_cached(path)
        if cached is not None:
            return _with_free_memory(cached, found).model_copy(update={"name": name})
    inventory = Inventory(name=name, fingerprint=key, devices=[measure(d, budget_s) for d in found])
    inventory.save(path)
    return inventory


def _load_cached(path: Path) -> Inventory | None:
    """The cached inventory, or None when it is unreadable or from another schema (re-measure)."""
    try:
        return Inventory.load(path)
    except ConfigError:
        return None


def _with_free_memory(inventory: Inventory, found: list[FoundDevice]) -> Inventory:
    """Free memory changes by the minute, so a cached profile takes today's figure."""
    free = {d.name: d.free_memory_bytes for d in found}
    devices = [d.model_copy(update={"free_memory_bytes": free.get(d.name, d.free_memory_bytes)})
               for d in inventory.devices]
    return inventory.model_copy(update={"devices": devices})
