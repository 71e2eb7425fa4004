"""Measure a CPU slice from inside it: a child process that enters the slice before it starts.

`measure_slice(CpuSlice(quota=0.5))` gives the profile of "half a core of this machine", timed
for real, so plans and benchmarks can use emulated devices of different speeds.
Run as `python -m alloy.devices.slice_worker SLICE_JSON BUDGET_S` (the child side).
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time

from alloy.devices.emulate import SliceGroup, slice_threads
from alloy.devices.measure import DeviceError
from alloy.devices.schema import CpuSlice, DeviceProfile


def measure_slice(spec: CpuSlice, *, name: str | None = None, budget_s: float = 2.0,
                  timeout_s: float = 120.0, probe: tuple[str, dict] | None = None) -> DeviceProfile:
    """The measured profile of a CPU slice of this machine (its cgroup is removed afterwards).

    `probe=("package.module:function", kwargs)` also runs that function inside the slice; it
    returns DeviceProfile fields to add (e.g. alloy.runtime.layer_profile.layer_probe: a model's
    layer times, for profile-guided planning). Named, not imported, so the devices package never
    builds a model itself (DESIGN.md: devices sit below model and runtime).
    """
    name = name or slice_name(spec)
    deadline = time.monotonic() + timeout_s
    with SliceGroup(spec) as group:
        # The child imports torch at full speed and says "ready"; only then is it put in the slice
        # (importing under a 25% quota alone takes ~15 s here).
        child = subprocess.Popen(
            [sys.executable, "-m", "alloy.devices.slice_worker", spec.model_dump_json(), str(budget_s),
             json.dumps({"function": probe[0], "kwargs": probe[1]}) if probe else ""],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if _read_line(child, deadline) != "ready":
                child.kill()
            else:
                group.add(child.pid)
                child.stdin.write("go\n")
                child.stdin.flush()
            out, err = child.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise DeviceError(f"measuring slice {name} took over {timeout_s:.0f} s") from None
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
    if child.returncode != 0:
        raise DeviceError(f"measuring slice {name} failed: {child_error(err)}")
    measured = DeviceProfile.model_validate_json(out.strip().splitlines()[-1])
    return measured.model_copy(update={"name": name})


ERROR_PREFIX = "slice_worker error: "


def child_error(stderr: str) -> str:
    """The cause a child process gave: its own one-line error if it printed one, else the last
    line that names an exception (a traceback's last line can be a library's footer, such as
    pydantic's "For further information visit ..."), else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX):]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[-1] if lines else "no output"


def _read_line(child: subprocess.Popen, deadline: float) -> str:
    ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        raise subprocess.TimeoutExpired(child.args, 0)
    return child.stdout.readline().strip()


def slice_name(spec: CpuSlice) -> str:
    """`cpu-c0.1-q0.5`: the cores and the quota, whichever are set."""
    parts = ["cpu"]
    if spec.cores:
        parts.append("c" + ".".join(map(str, spec.cores)))
    if spec.quota is not None:
        parts.append(f"q{spec.quota:g}")
    return "-".join(parts)


def _main(slice_json: str, budget_s: str, probe_json: str = "") -> None:
    import torch

    from alloy.devices.discovery import discover
    from alloy.devices.measure import measure

    from alloy.devices.emulate import slice_period_us
    from alloy.devices.measure import time_repetitions_over

    spec = CpuSlice.model_validate_json(slice_json)
    torch.set_num_threads(slice_threads(spec))
    if spec.quota is not None:
        time_repetitions_over(20 * slice_period_us(spec) / 1e6)  # a throughput over 20 CFS periods
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("slice_worker: parent did not say go")
    cpu = next(d for d in discover() if d.kind == "cpu")
    profile = measure(cpu, float(budget_s)).model_copy(update={"cpu_slice": spec})
    if probe_json:
        import importlib

        probe = json.loads(probe_json)
        module, function = probe["function"].split(":")
        fields = getattr(importlib.import_module(module), function)(**probe["kwargs"])
        profile = DeviceProfile.model_validate(profile.model_dump() | fields)
    print(profile.model_dump_json(exclude_none=True))


if __name__ == "__main__":
    try:
        _main(*sys.argv[1:4])
    except Exception as err:  # one line the parent can show: the cause, not a traceback's footer
        import traceback

        traceback.print_exc()
        print(ERROR_PREFIX + f"{type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        sys.exit(1)
