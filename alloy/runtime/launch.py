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

    def may_pass_again(self) -> bool:
        """Whether another try could meet another outcome: not for a worker's own error, a killed
        worker or a timeout (`_first_error` and `launch` word them), but for a rendezvous or a
        connection that broke, or an unexpected exception in a worker."""
        text = str(self)
        return not (text.startswith("alloy worker rank") or " died of " in text or "did not finish within" in text)


def nccl_usable() -> bool:
    """Whether this process can open NCCL groups: a torch build with NCCL, and CUDA here. A CPU
    build answers from its build flags; NCCL is never loaded to ask."""
    import torch
    import torch.distributed as dist

    return dist.is_nccl_available() and torch.cuda.is_available()


def init_gloo(nccl: bool = False, **kwargs) -> None:
    """`torch.distributed.init_process_group("gloo", ...)` for a worker, with torch.distributed.nn
    imported first. Imported later (alloy.load does, through torch._dynamo; so does the first
    AdamW step), its functions' `group=group.WORLD` defaults pin the default group, so
    destroy_process_group cannot stop gloo's threads, and one still releasing a tensor at
    interpreter exit aborts the rank ("terminate called without an active exception").

    `nccl` (a job whose GPU groups alloy.plan.transport puts on NCCL; only where `nccl_usable()`):
    the group gets NCCL for CUDA tensors beside gloo for host ones ("cpu:gloo,cuda:nccl"), so
    every group made after it sends each tensor by its device; barriers and object collectives
    stay on gloo."""
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt != "0":
        # After torchrun restarts the workers, the store still holds the dead ranks' gloo
        # addresses under the same keys, and the new ranks connect to those ("Connection
        # refused"): this attempt's keys get a prefix of their own.
        from datetime import timedelta

        from torch.distributed.rendezvous import _create_c10d_store

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        store = _create_c10d_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world,
                                   kwargs.get("timeout") or timedelta(minutes=5))
        kwargs |= {"store": dist.PrefixStore(f"alloy/attempt{attempt}", store), "rank": rank, "world_size": world}
    dist.init_process_group("cpu:gloo,cuda:nccl" if nccl else "gloo", **kwargs)


def worker_main(run: Callable[[dict], None], argv: list[str] | None = None) -> int:
    """The `__main__` of a worker module that `launch` starts (`python -m MODULE JOB.json`): run
    the job read from JOB.json; an AlloyError becomes the one line `alloy worker rank R: error: ...`
    that `launch` reports, and the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(json.loads(Path(argv[0]).read_text()))
    except AlloyError as err:
        print(f"alloy worker rank {os.environ.get('RANK', '?')}: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    return 0


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


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (PR_SET_PDEATHSIG), so a
    launcher killed with SIGKILL or SIGTERM takes torchrun, and torchrun its workers, along; a
    no-op where prctl is missing. A parent that died before the request took effect is never
    signalled for: this process then sends `sig` to itself."""
    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, sig, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # orphaned meanwhile: re-parented to init or a subreaper
        os.kill(os.getpid(), sig)


def torchrun_command(job_path: Path, nproc_per_node: int, rdzv: Rendezvous, endpoint: str,
                     worker_module: str = "alloy.runtime.worker", max_restarts: int = 0) -> list[str]:
    if rdzv.nnodes == 1:
        # is_host: this node serves the store. Left to guess, torchrun that finds the port taken
        # (another process got it between free_port() and here) joins whatever listens there as a
        # client and waits out the job's whole timeout; told, it fails at once and launch retries.
        meet = ["--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
                f"--rdzv-conf=join_timeout={int(rdzv.join_timeout_s)},read_timeout={int(rdzv.join_timeout_s)},"
                "is_host=1"]
    else:
        # Several nodes: the static rendezvous, because it numbers ranks node by node in --node-rank
        # order; c10d ignores --node-rank and orders nodes by host name and pid, which would hand
        # node 1's devices the stages planned for node 0's (and move rank 0, the server, with them).
        host, _, port = endpoint.rpartition(":")
        meet = ["--rdzv-backend=static", f"--master-addr={host}", f"--master-port={port}",
                f"--rdzv-conf=timeout={int(rdzv.join_timeout_s)}"]
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc-per-node={nproc_per_node}",
        f"--nnodes={rdzv.nnodes}",
        f"--node-rank={rdzv.node_rank}",
        *meet,
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        "-m", worker_module, str(job_path),
    ]


def launch(job, nproc_per_node: int, *, rdzv: Rendezvous = Rendezvous(), timeout_s: float = 600.0,
           env: dict | None = None, progress: Callable[[dict], None] | None = None,
           worker_module: str = "alloy.runtime.worker", max_restarts: int = 0) -> None:
    """Write the job beside its outputs (its out_dir) and run this node's workers — each
    `python -m worker_module JOB.json` — to completion. `job` is a dict, or an object with
    `to_dict()` (a TrainJob). With `max_restarts`, torchrun restarts every worker when one dies
    (the workers resume from their last complete checkpoint).

    `progress` is called with each new line of the job's metrics file (rank 0 writes one per
    step), so a front-end can draw a progress bar while the workers run.
    """
    job = job.to_dict() if hasattr(job, "to_dict") else job
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path = out_dir / f"job-node{rdzv.node_rank}.json"
    job_path.write_text(json.dumps(job, indent=1))
    log_path = out_dir / f"torchrun-node{rdzv.node_rank}.log"
    for _ in range(PORT_TRIES):
        endpoint = rdzv.endpoint or f"127.0.0.1:{free_port()}"
        cmd = torchrun_command(job_path, nproc_per_node, rdzv, endpoint, worker_module, max_restarts)
        if _run_torchrun(cmd, job, log_path, endpoint, timeout_s, env, progress) == 0:
            return
        log = log_path.read_text(errors="replace")
        # No worker ran yet when the store could not be hosted, so running again loses nothing.
        if rdzv.endpoint or not _PORT_TAKEN.search(log):
            break
    raise LaunchError(f"{_first_error(log, endpoint)} (every rank's output: {log_path})")


PORT_TRIES = 3
# torchrun's words when the c10d store cannot listen on the rendezvous port
_PORT_TAKEN = re.compile(r"EADDRINUSE|[Aa]ddress already in use|The connection to the C10d store has failed")


def _run_torchrun(cmd: list[str], job: dict, log_path: Path, endpoint: str, timeout_s: float, env: dict | None,
                  progress) -> int:
    """Run one torchrun to completion (or kill it at the deadline); its exit code."""
    metrics = Path(job["metrics_path"]) if job.get("metrics_path") else None
    seen = metrics.stat().st_size if metrics and metrics.exists() else 0
    deadline = time.monotonic() + timeout_s
    with open(log_path, "w") as log:
        # its own session (Ctrl-C reaches it through us, once), and it dies with us (SIGTERM lets
        # torchrun stop its workers; they in turn die with torchrun)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=lambda: die_with_parent(signal.SIGTERM))
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
    return proc.returncode


def _follow(metrics: Path | None, seen: int, progress) -> int:
    """Hand the metrics lines written since byte `seen` to `progress`; return the new offset."""
    if progress is None or metrics is None or not metrics.exists():
        return seen
    seen = min(seen, metrics.stat().st_size)  # a restarted run drops the lines it will run again
    with open(metrics) as handle:
        handle.seek(seen)
        chunk = handle.read()
    complete = chunk[: chunk.rfind("\n") + 1]
    for line in complete.splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:  # read across a restart's rewrite of the file: skip the piece
            record = None
        if record is not None:
            progress(record)
    return seen + len(complete.encode())


_KILLED = re.compile(r"failed \(exitcode: (-\d+)\) local_rank: (\d+)")


def _peer_gone(message: str) -> bool:
    return any(words in message for words in ("closed by peer", "reset by peer", "Connection closed"))


def _died(rank, code: int) -> str:
    """'worker rank R died of exit code -N (SIGNAME...)' for a negative (signal) exit code."""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    how = f"exit code {code} ({name}"
    how += ", which on Linux is most often the out-of-memory killer)" if name == "SIGKILL" else ")"
    return f"worker rank {rank} died of {how}"


_FATAL = re.compile(r"(terminate called.*|Fatal Python error: .*|Segmentation fault.*|Killed)$")


def _first_error(log: str, endpoint: str) -> str:
    lines = log.splitlines()
    for line in lines:
        if line.startswith("alloy worker"):
            return line
    # An unexpected exception in a worker: its last line says what. The rank whose peer died first
    # reports only the closed connection, so a rank with another error is the cause.
    failures = [m for m in (re.match(r"\[rank(\d+)\]: ([\w.]+(Error|Exception): .*)", l) for l in lines) if m]
    own = [m for m in failures if not _peer_gone(m.group(2))]
    if own:
        return f"worker rank {own[0].group(1)} failed: {own[0].group(2)[:300]}"
    # A rank killed by a signal takes its peers down with "connection reset": torchrun's first
    # "failed (exitcode: -N)" line names the rank that died first.
    killed = next((m for m in map(_KILLED.search, lines) if m), None)
    fatal = next((m.group(1) for m in map(_FATAL.search, lines) if m), None)  # a native crash's own line
    if killed:
        return _died(killed.group(2), int(killed.group(1))) + (f": {fatal}" if fatal else "")
    if failures:
        return f"worker rank {failures[0].group(1)} failed: {failures[0].group(2)[:300]}"
    if "RendezvousTimeoutError" in log or "RendezvousConnectionError" in log or "timed out" in log.lower():
        return f"could not reach the rendezvous at {endpoint} in time"
    # Otherwise torchrun's "Root Cause (first observed failure)" block names the rank.
    root = log.split("Root Cause (first observed failure)", 1)[-1] if "Root Cause" in log else ""
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    if rank and code:
        died = _died(rank.group(1), int(code.group(1))) if int(code.group(1)) < 0 else \
            f"worker rank {rank.group(1)} died of exit code {code.group(1)}"
        return died + (f": {fatal}" if fatal else "")
    if fatal:
        return f"a worker died: {fatal}"
    for line in lines:  # a traceback without torchrun's rank prefix: its last line
        match = re.match(r"(\w+(Error|Exception): .*)", line)
        if match and "ChildFailedError" not in line:
            return f"worker failed: {match.group(1)[:300]}"
    # never a separator (torchrun's summary is framed by lines of = and -)
    tail = [l for l in lines if l.strip() and not set(l.strip()) <= set("=-*")][-1:] or ["(no output)"]
    return f"workers failed: {tail[0][:300]}"
