"""One rank of a multi-device `alloy.Model.fit`: `python -m alloy.framework.worker JOB.json`.

`Model.fit` starts the ranks with the runtime's launcher (alloy.runtime.launch: torchrun, gloo).
The job JSON is a typed FitJob (alloy.framework.job: the run settings, the device profiles and
their weights, the parent's module search path); the module, its optimizer's settings and state,
the data, the callbacks and a resumed fit's start are in a `torch.save` file beside it
(`payload`). Each rank enters its emulated CPU slice, if it has one, joins the process group,
runs the framework's training loop on its rows of every batch (or, pipeline parallel, on every
batch through its stage's children: alloy.framework.pipeline; rank 0 writing the fit's
checkpoints), and rank 0 writes the trained weights, the history and the optimizer's state into
the job's directory; with `verbose`, the rank that counts the loss (rank 0, or a pipeline's last
stage) also writes one progress line per step to the job's metrics file, which the launcher follows.
"""

from __future__ import annotations

import json
import multiprocessing.spawn
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

# rank 0's results, in the job's out_dir
STATE, HISTORY, OPTIMIZER = "state.safetensors", "history.json", "optimizer.pt"


def main_module_data() -> dict:
    """What a rank needs to unpickle classes the parent's script defines (its `__main__` and
    module search path), as multiprocessing's spawn start method passes them on."""
    data = multiprocessing.spawn.get_preparation_data("alloy-fit")
    return {k: data[k] for k in ("sys_path", "init_main_from_name", "init_main_from_path") if k in data}


def run_rank(doc: dict) -> None:
    from alloy.devices import DeviceProfile
    from alloy.devices.emulate import slice_context
    from alloy.framework.job import FitJob
    from alloy.framework.model import _fit_loop, _Rank
    from alloy.framework.pipeline import Pipeline
    from alloy.framework.registry import make_optimizer
    from alloy.runtime.launch import die_with_parent, init_gloo

    die_with_parent()  # torchrun gone (killed, or its launcher was): this rank goes too
    job = FitJob.from_dict(doc)
    multiprocessing.spawn.prepare(job.main)
    rank = int(os.environ["RANK"])
    profile = DeviceProfile.model_validate(job.profiles[rank]) if job.profiles[rank] else None
    # CPU ranks of one machine share its cores (a slice sets its own count when entered)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // len(job.weights)))
    with slice_context(profile.cpu_slice if profile else None):
        init_gloo(timeout=timedelta(seconds=job.timeout_s))
        try:
            # Unpickled on purpose: fit's own payload (a user's nn.Module class and callbacks, as
            # multiprocessing's spawn pickled them before), written by this job's parent into its
            # private mkdtemp (mode 0700) moments ago; never a file a user hands in.
            payload = torch.load(job.payload, weights_only=False)
            model = payload["model"]
            model.optimizer = make_optimizer(model.compiled["optimizer"], model.module.parameters(),
                                             model.compiled["lr"])
            # the parent's optimizer state: a checkpoint's, an earlier fit's, or a fresh one's
            model.optimizer.load_state_dict(payload["optimizer_state"])
            torch.manual_seed(job.torch_seeds[rank])
            me = _Rank(rank, job.weights)
            if job.stage_cuts is not None:
                me.pipeline = Pipeline.for_rank(model.module, job.stage_cuts, rank, job.micro_batches,
                                                payload["inputs"][0][:1])
            counter = len(job.weights) - 1 if me.pipeline else 0  # the rank that counts the loss
            report = _metrics_writer(job.metrics_path) if rank == counter and job.metrics_path else None
            history = _fit_loop(model, payload["inputs"], payload["targets"], payload["val"], payload["callbacks"],
                                job.run, me, report, payload["start"])
            if rank == 0:
                out_dir = Path(job.out_dir)
                state = {k: v.detach().cpu().contiguous() for k, v in model.module.state_dict().items()}
                save_file(state, str(out_dir / STATE))
                (out_dir / HISTORY).write_text(json.dumps({"history": history.history, "epochs": history.epochs}))
                torch.save(model.optimizer.state_dict(), out_dir / OPTIMIZER)
            dist.barrier()
        finally:
            dist.destroy_process_group()


def _metrics_writer(path: str):
    def write(record: dict) -> None:
        with open(path, "a") as handle:
            handle.write(json.dumps(record | {"time": time.time()}) + "\n")
    return write


if __name__ == "__main__":
    from alloy.runtime.launch import worker_main

    sys.exit(worker_main(run_rank))
