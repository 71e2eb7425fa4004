"""The one rule for how a set of devices exchanges tensors: NCCL or gloo.

The planner prices each pipeline's messages and the step's collectives by it (alloy.plan.timing)
and the training runtime opens its process groups by it (alloy.runtime.layout.job_transports),
so a plan's `links[].transport` and `collective_transport` are what the run uses. No torch here:
whether NCCL is usable is the caller's to say (the planner: for training plans; the runtime:
`torch.distributed.is_nccl_available()` and CUDA present).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from alloy.devices import DeviceProfile

Transport = Literal["gloo", "nccl"]


def transport(devices: Sequence[DeviceProfile], nccl_usable: bool = True) -> Transport:
    """"nccl" when the set is two or more distinct CUDA GPUs of one node and NCCL is usable,
    else "gloo" (which carries host tensors: a GPU end copies through host memory).

    Why each condition: NCCL moves only CUDA tensors, so one CPU member puts the whole set on
    gloo; across nodes the links a plan prices are the host network's, which Alloy neither sets up
    nor measures for NCCL; NCCL refuses two ranks on one GPU, so a device named twice stays on
    gloo. A device's node is its profile's `node` (devices on one node share it)."""
    if not nccl_usable or len(devices) < 2:
        return "gloo"
    if any(d.kind != "cuda" for d in devices):
        return "gloo"
    if len({d.node for d in devices}) != 1 or len({d.name for d in devices}) != len(devices):
        return "gloo"
    return "nccl"
