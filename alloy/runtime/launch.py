"""Start a job with `torchrun` (PyTorch's own launcher): locally, or one node of several.

Alloy invents no cluster manager: a local job is `torchrun --nproc-per-node N` on a free
loopback port; a multi-machine job is the same worker under
`torchrun --nnodes N --node-rank K --rdzv-backend c10d --rdzv-endpoint HOST:PORT` on each node.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alloy.errors import AlloyError


class LaunchError(AlloyError):
    """A job that could not start, or whose workers failed or did not finish in time."""


def init_gloo(**kwargs) -> None:
    """`torch.distributed.init_process_group("gloo", ...)` for a worker, with torch.distributed.nn
    imported first. Imported later (alloy.load does, through torch._dynamo; so does the first
    AdamW step), its functions' `group=group.WORLD` defaults pin the default group, so
    destroy_process_group cannot stop gloo's threads, and one still releasing a tensor at
    interpreter exit aborts the rank ("terminate called without an active exception")."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401

    dist.init_process_group("gloo", **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    nnodes: int = 1
    node_rank: int = 0
    endpoint: str = ""  # HOST:PORT of node 0; empty means a free loopback port (single node)
    join_timeout_s: float = 60.0


def torchrun_command(job_path: Path, nproc_per_node: int, rdzv: Rendezvous, endpoint: str,
                     worker_module: str = "alloy.runtime.worker") -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}",
        f"--nnodes={rdzv.nnodes}",
        f"--node-rank={rdzv.node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-conf=join_timeout={int(rdzv.join_timeout_s)},read_timeout={int(rdzv.join_timeout_s)}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "-m", worker_module, str(job_path),
    ]


def launch(job: dict, nproc_per_node: int, *, rdzv: Rendezvous = Rendezvous(), timeout_s: float = 600.0,
           env: dict | None = None, progress: Callable[[dict], None] | None = None,
           worker_module: str = "alloy.runtime.worker") -> None:
    """Write the job beside its outputs (job["out_dir"]) and run this node's workers — each
    `python -m worker_module JOB.json` — to completion.

    `progress` is called with each new line of the job's metrics file (rank 0 writes one per
    step), so a front-end can draw a progress bar while the workers run.
    """
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path = out_dir / f"job-node{rdzv.node_rank}.json"
    job_path.write_text(json.dumps(job, indent=1))
    endpoint = rdzv.endpoint or f"127.0.0.1:{free_port()}"
    cmd = torchrun_command(job_path, nproc_per_node, rdzv, endpoint, worker_module)
    log_path = out_dir / f"torchrun-node{rdzv.node_rank}.log"
    metrics = Path(job["metrics_path"]) if job.get("metrics_path") else None
    seen = metrics.stat().st_size if metrics and metrics.exists() else 0
    deadline = time.monotonic() + timeout_s
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    raise LaunchError(f"the job did not finish within {timeout_s:.0f} s (rendezvous {endpoint})")
                seen = _follow(metrics, seen, progress)
                time.sleep(0.2)
            _follow(metrics, seen, progress)
        finally:
            if proc.poll() is None:  # timeout or Ctrl-C: stop every worker we started, then reap them
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if proc.returncode != 0:
        raise LaunchError(_first_error(log_path.read_text(errors="replace"), endpoint))


def _follow(metrics: Path | None, seen: int, progress) -> int:
    """Hand the metrics lines written since byte `seen` to `progress`; return the new offset."""
    if progress is None or metrics is None or not metrics.exists():
        return seen
    with open(metrics) as handle:
        handle.seek(seen)
        chunk = handle.read()
    complete = chunk[: chunk.rfind("\n") + 1]
    for line in complete.splitlines():
        if line.strip():
            progress(json.loads(line))
    return seen + len(complete.encode())


_FATAL = re.compile(r"(terminate called.*|Fatal Python error: .*|Segmentation fault.*|Killed)$")


def _first_error(log: str, endpoint: str) -> str:
    lines = log.splitlines()
    for line in lines:
        if line.startswith("alloy worker"):
            return line
    # An unexpected exception in a worker: its last line says what. The rank whose peer died first
    # reports only the closed connection, so a rank with another error is the cause.
    failures = [m for m in (re.match(r"\[rank(\d+)\]: ([\w.]+(Error|Exception): .*)", l) for l in lines) if m]
    for match in sorted(failures, key=lambda m: "closed by peer" in m.group(2) or "reset by peer" in m.group(2)):
        return f"worker rank {match.group(1)} failed: {match.group(2)[:300]}"
    if "RendezvousTimeoutError" in log or "RendezvousConnectionError" in log or "timed out" in log.lower():
        return f"could not reach the rendezvous at {endpoint} in time"
    # A rank killed by a signal: torchrun's "Root Cause (first observed failure)" block names it,
    # and a native crash prints its own line ("terminate called ...") before the summary.
    fatal = next((m.group(1) for m in map(_FATAL.search, lines) if m), None)
    root = log.split("Root Cause (first observed failure)", 1)[-1] if "Root Cause" in log else ""
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    signal_name = re.search(r"Signal \d+ \((\w+)\)", root)
    if rank and code:
        how = f"exit code {code.group(1)}" + (f" ({signal_name.group(1)})" if signal_name else "")
        return f"worker rank {rank.group(1)} died of {how}" + (f": {fatal}" if fatal else "")
    if fatal:
        return f"a worker died: {fatal}"
    for line in lines:  # a traceback without torchrun's rank prefix: its last line
        match = re.match(r"(\w+(Error|Exception): .*)", line)
        if match and "ChildFailedError" not in line:
            return f"worker failed: {match.group(1)[:300]}"
    # never a separator (torchrun's summary is framed by lines of = and -)
    tail = [l for l in lines if l.strip() and not set(l.strip()) <= set("=-*")][-1:] or ["(no output)"]
    return f"workers failed: {tail[0][:300]}"
