"""Runtime: execute a Plan on torch.distributed (seed step 3, parallel training).

`run(...)` launches the workers with torchrun and returns what they measured; each worker
(alloy.runtime.worker) runs a StageRunner: its stage of its replica, exact loss weighting for
uneven batch shares, pipeline schedules from torch.distributed.pipelining, and a gradient
all-reduce among the ranks that hold the same parameters.
"""

from alloy.runtime.data import DataSource
from alloy.runtime.engine import OptimConfig, StageRunner
from alloy.runtime.job import Checkpointing, JobError, TrainJob
from alloy.runtime.launch import LaunchError, Rendezvous, launch
from alloy.runtime.layout import PlanMismatchError, RunLayout
from alloy.runtime.reference import reference_run
from alloy.runtime.run import RunReport, job_document, run, run_job

__all__ = ["Checkpointing", "DataSource", "JobError", "LaunchError", "OptimConfig", "PlanMismatchError",
           "Rendezvous", "RunLayout", "RunReport", "StageRunner", "TrainJob", "job_document", "launch",
           "reference_run", "run", "run_job"]
