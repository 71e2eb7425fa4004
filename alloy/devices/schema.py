"""Device profiles and inventories: plain versioned JSON documents (pydantic models).

A profile says what one device can measurably do — sustained matmul FLOP/s per dtype, memory
bandwidth, capacity, its link to the host. An inventory is the devices of a job (measured
here, gathered from several ranks, or declared by hand for a cluster that is not here) plus the
links between them. The planner reads inventories; it never measures anything itself.

Units are in the names: `_bytes`, `_bytes_per_s`, `_flops` (FLOP/s), `_s`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from alloy.errors import ConfigError
from alloy.jsonio import read_json_object, validation_message, write_text_atomic

SCHEMA_VERSION = 1
Dtype = Literal["fp32", "bf16", "fp16", "fp8", "int8"]
DeviceKind = Literal["cpu", "cuda", "mps", "xpu"]


# Planning is O(devices^2) in links and its heuristics grow with the count: 1024 devices plan in
# ~2 s, 4096 in ~30 s. Beyond any heterogeneous cluster Alloy targets, so refused rather than waited on.
MAX_DEVICES = 1024


class _Doc(BaseModel):
    # A rate or size of inf/nan would only surface as a nonsense plan: refused at the field.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LinkSpec(_Doc):
    bandwidth_bytes_per_s: float = Field(gt=0)
    latency_s: float = Field(default=0.0, ge=0)  # a message right after a burst of work (training)
    # a message to a rank that was waiting, not working: inference's stages and expert ranks take
    # turns (a CPU quota slice then answers at once, not a throttling period later); None: latency_s
    idle_latency_s: float | None = Field(default=None, ge=0)


class Link(LinkSpec):
    """A measured or declared link between two named devices (symmetric)."""

    a: str
    b: str


class CpuSlice(_Doc):
    """An emulated CPU device: a set of cores and/or a CPU quota (fraction of one core's time)."""

    cores: list[int] = Field(default_factory=list)
    quota: float | None = Field(default=None, gt=0)  # cores' worth of CPU time, e.g. 0.5


class MeasuredLayerTimes(_Doc):
    """Measured wall time of one transformer layer by batch size, for one model and one phase.

    Used by the cost model in place of its FLOP-rate estimate when the model matches (same hidden
    size and layer count); linearly interpolated between rows, extrapolated from the last two.
    `batch` is samples per micro-batch (train: forward+backward), prompt tokens (prefill) or
    requests (decode). `first_s` / `last_s` are the extra time of the embedding / head pieces.
    """

    model: str = ""  # a readable name of the profiled model
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    phase: Literal["train", "prefill", "decode"]
    batch: list[float] = Field(min_length=1)
    layer_s: list[float] = Field(min_length=1)
    first_s: list[float] = Field(default_factory=list)  # same length as batch, or empty
    last_s: list[float] = Field(default_factory=list)
    source: str = ""  # where the numbers come from

    @model_validator(mode="after")
    def _rows_match(self) -> "MeasuredLayerTimes":
        for name in ("layer_s", "first_s", "last_s"):
            values = getattr(self, name)
            if values and len(values) != len(self.batch):
                raise ValueError(f"{name} has {len(values)} rows, batch has {len(self.batch)}")
        if any(b2 <= b1 for b1, b2 in zip(self.batch, self.batch[1:])):
            raise ValueError("batch sizes must be strictly increasing")
        return self


class DeviceProfile(_Doc):
    name: str = Field(min_length=1)  # unique within an inventory, e.g. "cpu", "cuda:0", "a100-3"
    kind: DeviceKind
    model: str = ""  # marketing name, e.g. "NVIDIA A100-SXM4-40GB"
    node: str = "local"  # the machine it sits in; devices on one node share its intra-node links
    count: int = Field(default=1, ge=1, le=MAX_DEVICES)  # declared files may say "8 of these"; expanded on load
    memory_bytes: int = Field(gt=0)  # capacity usable for weights, activations and caches
    free_memory_bytes: int | None = Field(default=None, ge=0)
    matmul_flops: dict[Dtype, float] = Field(min_length=1)  # sustained FLOP/s per well-supported dtype
    slow_dtypes: dict[Dtype, str] = Field(default_factory=dict)  # dtype -> why it was not timed
    memory_bandwidth_bytes_per_s: float = Field(gt=0)
    host_link_bytes_per_s: float | None = Field(default=None, gt=0)  # host <-> device copies
    threads: int | None = Field(default=None, ge=1)  # CPU threads this device's worker may use
    cpu_slice: CpuSlice | None = None
    isa_flags: list[str] = Field(default_factory=list)  # CPU features that matter (avx512_bf16, amx...)
    measured: bool = False  # True when timed on this hardware, False when declared
    compute_capability: str | None = None  # CUDA only, e.g. "8.0"
    measure_s: float | None = None  # how long measuring this device took
    layer_times: list[MeasuredLayerTimes] = Field(default_factory=list)  # measured per-layer profiles
    # What the runtime pays beyond the layers (alloy.runtime.calibrate measures them on the workers):
    optimizer_s_per_param: float | None = Field(default=None, ge=0)  # AdamW update of one parameter
    micro_batch_overhead_s: float | None = Field(default=None, ge=0)  # per micro-batch on a pipeline stage

    @model_validator(mode="before")
    @classmethod
    def _retired_fields(cls, data):
        # `tensor_parallel` was a tag no planner or runtime code read (the rates are a TP group's
        # totals either way); plans and inventories written with it, `"tensor_parallel": 1` in every
        # device, still load.
        if isinstance(data, dict) and "tensor_parallel" in data:
            data = {k: v for k, v in data.items() if k != "tensor_parallel"}
        return data

    @model_validator(mode="after")
    def _rates_positive(self) -> "DeviceProfile":
        for dtype, rate in self.matmul_flops.items():
            if not rate > 0:
                raise ValueError(f"matmul_flops[{dtype}] must be > 0, got {rate}")
        return self

    def measured_layers(self, hidden_size: int, num_layers: int, phase: str) -> "MeasuredLayerTimes | None":
        """The measured per-layer profile of this model and phase, if the profile carries one."""
        for m in self.layer_times:
            if (m.hidden_size, m.num_layers, m.phase) == (hidden_size, num_layers, phase):
                return m
        return None

    def flops(self, dtype: str) -> float:
        """Sustained matmul FLOP/s in `dtype`; falls back to fp32 for a dtype not profiled, and
        refuses one the device is known to run pathologically slowly (no fast path)."""
        if dtype in self.slow_dtypes and dtype not in self.matmul_flops:
            fast = ", ".join(self.matmul_flops)
            raise ConfigError(f"device {self.name!r} has no fast {dtype} path ({self.slow_dtypes[dtype]}); "
                              f"use a dtype it runs well: {fast}")
        if dtype in self.matmul_flops:
            return self.matmul_flops[dtype]
        if "fp32" in self.matmul_flops:
            return self.matmul_flops["fp32"]
        raise ConfigError(f"device {self.name!r} has no matmul rate for {dtype} (profiled: {list(self.matmul_flops)})")


class Inventory(_Doc):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = "local"
    fingerprint: str | None = None  # hardware fingerprint of a measured inventory (cache key)
    devices: list[DeviceProfile] = Field(min_length=1)
    links: list[Link] = Field(default_factory=list)  # explicit pairs win over the defaults below
    intra_node_link: LinkSpec = LinkSpec(bandwidth_bytes_per_s=16e9, latency_s=10e-6)  # PCIe 4 x16-ish
    inter_node_link: LinkSpec = LinkSpec(bandwidth_bytes_per_s=1.25e9, latency_s=100e-6)  # 10 GbE
    # Measured on these devices' own workers (alloy.runtime.calibrate); None: estimated from the links.
    allreduce: LinkSpec | None = None  # one all-reduce call: latency_s a call, ring bandwidth
    startup_s: float | None = Field(default=None, ge=0)  # launching the workers, until the first step
    calibrated: str | None = None  # when and how the runtime terms above were measured
    calibration_key: str | None = None  # its cache entry: runs on these devices refine it (calibrate.learn)

    @model_validator(mode="after")
    def _expand_and_check(self) -> "Inventory":
        if sum(d.count for d in self.devices) > MAX_DEVICES:
            raise ValueError(f"{sum(d.count for d in self.devices)} devices: at most {MAX_DEVICES} are planned over")
        expanded: list[DeviceProfile] = []
        for device in self.devices:
            if device.count == 1:
                expanded.append(device)
            else:
                expanded += [device.model_copy(update={"name": f"{device.name}-{i}", "count": 1})
                             for i in range(device.count)]
        names = [d.name for d in expanded]
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate:
            raise ValueError(f"device name {duplicate!r} appears twice")
        for link in self.links:
            for end in (link.a, link.b):
                if end not in names:
                    raise ValueError(f"link names unknown device {end!r}")
        object.__setattr__(self, "devices", expanded)
        return self

    @functools.cached_property
    def _by_name(self) -> dict[str, DeviceProfile]:
        return {d.name: d for d in self.devices}

    @functools.cached_property
    def _links_by_ends(self) -> dict[frozenset, Link]:
        return {frozenset((link.a, link.b)): link for link in self.links}

    def device(self, name: str) -> DeviceProfile:
        # A dict, not a scan: the planner asks for every pair of a 1024-device cluster.
        if name in self._by_name:
            return self._by_name[name]
        raise ConfigError(f"unknown device {name!r}; the inventory has {', '.join(d.name for d in self.devices)}")

    def link(self, a: str, b: str) -> LinkSpec:
        """Bandwidth and latency between two devices: an explicit link, else the node defaults."""
        link = self._links_by_ends.get(frozenset((a, b)))
        if link is not None:
            return link
        if self.device(a).node == self.device(b).node:
            return self.intra_node_link
        return self.inter_node_link

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True) + "\n"

    def save(self, path: str | Path) -> None:
        write_text_atomic(path, self.to_json())

    @classmethod
    def parse(cls, data: dict | str, source: str = "inventory") -> "Inventory":
        """Validate a document; errors name the offending field in one line."""
        try:
            if isinstance(data, str):
                return cls.model_validate_json(data)
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(f"{source}: {validation_message(err)}") from None

    @classmethod
    def load(cls, path: str | Path) -> "Inventory":
        return cls.parse(read_json_object(path, "device/cluster file"), source=str(path))
