"""Devices: what each one can measurably do (profiles), and the links between them."""

from alloy.devices.profile import SCHEMA_VERSION, CpuSlice, DeviceProfile, Inventory, Link, LinkSpec

__all__ = ["SCHEMA_VERSION", "CpuSlice", "DeviceProfile", "Inventory", "Link", "LinkSpec"]
