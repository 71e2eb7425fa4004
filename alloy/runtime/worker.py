"""The process `torchrun` starts for each rank: `python -m alloy.runtime.worker JOB.json`.

It reads the job (spec, layout, devices, data, steps), takes its rank's stage, enters its
emulated CPU slice or its device, trains, and writes its shard and its step records.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from alloy.devices import DeviceProfile
from alloy.errors import AlloyError
from alloy.runtime.data import DataSource
from alloy.runtime.engine import OptimConfig, StageRunner
from alloy.runtime.layout import PlanMismatchError, RunLayout
from alloy.spec import ModelSpec


def torch_device(profile: DeviceProfile | None) -> torch.device:
    if profile is None or profile.kind == "cpu":
        return torch.device("cpu")
    if profile.kind == "cuda":
        # A declared "cuda:N" names its index; otherwise this node's local rank picks the GPU.
        index = profile.name.split(":", 1)[1] if profile.name.startswith("cuda:") else os.environ.get("LOCAL_RANK", "0")
        return torch.device(f"cuda:{index}")
    return torch.device(profile.kind)


def _slice_context(profile: DeviceProfile | None):
    if profile is None or profile.cpu_slice is None:
        return nullcontext()
    from alloy.devices.emulate import cpu_slice, slice_threads

    torch.set_num_threads(slice_threads(profile.cpu_slice))
    return cpu_slice(profile.cpu_slice)


def run_worker(job: dict) -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    spec = ModelSpec.from_dict(job["spec"])
    layout = RunLayout.from_dict(job["layout"])
    layout.validate(spec)
    if world != layout.world_size:
        raise PlanMismatchError(f"the job has {world} ranks but the plan needs {layout.world_size}")
    info = layout.rank(rank)
    profiles = {name: DeviceProfile.model_validate(p) for name, p in job.get("devices", {}).items()}
    profile = profiles.get(info.stage.device)
    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    elif profile is None or profile.kind == "cpu":
        # CPU workers of one node share its cores; oversubscribing them slows every rank.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))
    timeout = timedelta(seconds=float(job.get("timeout_s", 300)))
    out_dir = Path(job["out_dir"])
    with ExitStack() as stack:
        stack.enter_context(_slice_context(profile))
        dist.init_process_group("gloo", timeout=timeout)
        stack.callback(dist.destroy_process_group)
        runner = StageRunner(
            spec, layout, rank, device=torch_device(profile), seed=int(job.get("seed", 0)),
            init_dir=job.get("init_dir"), optim=OptimConfig(**job.get("optim", {})),
            schedule=job.get("schedule", "1f1b"), timeout=timeout,
        )
        data = DataSource(**job.get("data", {}))
        records = []
        if job.get("stall_rank") == rank:  # fault injection: a rank that never arrives (timeout tests)
            time.sleep(10 * timeout.total_seconds())
        for step in range(int(job["steps"])):
            batch = data.batch(step, layout.global_batch, int(job["seq_len"]), spec.vocab_size)
            records.append(asdict(runner.step(step, batch)))
        save_file(runner.named_state(), str(out_dir / f"rank{rank}.safetensors"))
        (out_dir / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "replica": info.replica, "stage": info.stage_index, "device": info.stage.device,
            "layers": [info.stage.first, info.stage.last], "records": records,
        }))
        dist.barrier()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK", "?")
    try:
        run_worker(json.loads(Path(argv[0]).read_text()))
    except AlloyError as err:
        print(f"alloy worker rank {rank}: error: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    except dist.DistBackendError as err:
        print(f"alloy worker rank {rank}: error: a collective failed or timed out ({' '.join(str(err).split())[:300]})",
              file=sys.stderr, flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
