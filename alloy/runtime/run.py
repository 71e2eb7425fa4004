"""`run(plan, ...)`: train for some steps exactly as a Plan says, and report what was measured.

The small API the training front-ends build on: it turns the Plan into a job document, starts
the workers with torchrun, and reads back each rank's step records and final shard.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from alloy.runtime.data import DataSource
from alloy.runtime.engine import PIPELINE_SCHEDULES, OptimConfig
from alloy.runtime.launch import Rendezvous, launch
from alloy.runtime.layout import PlanMismatchError, RunLayout
from alloy.spec import ModelSpec


@dataclass
class RunReport:
    out_dir: Path
    losses: list[float]  # global mean loss per step
    ranks: list[dict]  # per rank: device, layers, per-step records
    predicted_step_s: float | None
    measured_step_s: float  # median over steps (after the first) of the slowest rank's step
    tokens_per_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def prediction_error(self) -> float | None:
        """|measured - predicted| / measured, or None without a prediction."""
        if not self.predicted_step_s:
            return None
        return abs(self.measured_step_s - self.predicted_step_s) / self.measured_step_s

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Replica 0's parameters from every stage's shard: the whole trained model's state."""
        state: dict[str, torch.Tensor] = {}
        for info in self.ranks:
            if info["replica"] == 0:
                state.update(load_file(self.out_dir / f"rank{info['rank']}.safetensors"))
        return state


def job_document(spec: ModelSpec, layout: RunLayout, *, steps: int, seq_len: int, out_dir: str | Path,
                 data: DataSource = DataSource(), seed: int = 0, optim: OptimConfig = OptimConfig(),
                 pipeline_schedule: str = "1f1b", devices: dict | None = None, init_dir: str | None = None,
                 threads: int | None = None, timeout_s: float = 300.0, predicted_step_s: float | None = None,
                 **extra) -> dict:
    """The document every worker reads. `extra` carries the training-run keys (val_data,
    eval_every, eval_batches, grad_accum, precision, activation_checkpointing, checkpoint,
    resume, stop_at, metrics_path): see alloy.runtime.worker."""
    layout.validate(spec)
    if pipeline_schedule not in PIPELINE_SCHEDULES:
        raise PlanMismatchError(f"pipeline schedule {pipeline_schedule!r} is not one of {', '.join(PIPELINE_SCHEDULES)}")
    if seq_len > spec.max_seq_len:
        raise PlanMismatchError(f"seq_len {seq_len} exceeds the model's maximum {spec.max_seq_len}")
    missing = {s.device for r in layout.replicas for s in r} - set(devices or {}) if devices is not None else set()
    if missing:
        raise PlanMismatchError(f"the plan's stages use devices it does not describe: {', '.join(sorted(missing))}")
    return dict(spec=spec.to_dict(), layout=layout.to_dict(), steps=steps, seq_len=seq_len, out_dir=str(out_dir),
                data=asdict(data), seed=seed, optim=asdict(optim), pipeline_schedule=pipeline_schedule,
                devices=devices or {}, init_dir=init_dir, threads=threads, timeout_s=timeout_s,
                predicted_step_s=predicted_step_s, **extra)


def run(plan, *, steps: int, out_dir: str | Path, spec: ModelSpec | None = None, data: DataSource = DataSource(),
        seq_len: int | None = None, seed: int = 0, optim: OptimConfig = OptimConfig(),
        pipeline_schedule: str = "1f1b", init_dir: str | None = None, threads: int | None = None,
        rdzv: Rendezvous = Rendezvous(), timeout_s: float = 600.0, progress=None, **extra) -> RunReport:
    """Execute an `alloy.plan.Plan` for `steps` optimizer steps on this node's share of ranks."""
    plan_spec = ModelSpec.from_dict(plan.model.spec)
    if spec is not None and spec != plan_spec:
        changed = next(k for k, v in spec.to_dict().items() if plan_spec.to_dict()[k] != v)
        raise PlanMismatchError(f"the plan was made for a different model ({changed}: "
                                f"{plan_spec.to_dict()[changed]} in the plan, {spec.to_dict()[changed]} given)")
    layout = RunLayout.from_plan(plan)
    job = job_document(plan_spec, layout, steps=steps, seq_len=seq_len or plan.seq_len, out_dir=out_dir, data=data,
                       seed=seed, optim=optim, pipeline_schedule=pipeline_schedule, init_dir=init_dir,
                       threads=threads, devices={d.name: d.model_dump() for d in plan.devices},
                       timeout_s=timeout_s, predicted_step_s=plan.predicted.step_s, **extra)
    return run_job(job, rdzv=rdzv, timeout_s=timeout_s, progress=progress)


def run_job(job: dict, *, rdzv: Rendezvous = Rendezvous(), timeout_s: float = 600.0, progress=None) -> RunReport:
    """Launch this node's workers; `progress(line)` is called with each metrics line as it lands."""
    layout = RunLayout.from_dict(job["layout"])
    if layout.world_size % rdzv.nnodes:
        raise PlanMismatchError(f"{layout.world_size} ranks do not split evenly over {rdzv.nnodes} nodes")
    launch(job, layout.world_size // rdzv.nnodes, rdzv=rdzv, timeout_s=timeout_s, progress=progress)
    return read_report(job)


def read_report(job: dict) -> RunReport:
    out_dir = Path(job["out_dir"])
    layout = RunLayout.from_dict(job["layout"])
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(layout.world_size)]
    steps = len(ranks[0]["records"])
    if steps == 0:
        raise PlanMismatchError(f"{out_dir}: the run took no step (it was already at step {ranks[0]['start_step']})")
    slowest = [max(r["records"][i]["step_s"] for r in ranks) for i in range(steps)]
    measured = statistics.median(slowest[1:] if steps > 1 else slowest)  # step 0 pays warm-up
    tokens = layout.global_batch * int(job["seq_len"]) * int(job.get("grad_accum", 1))
    report = RunReport(out_dir, [rec["loss"] for rec in ranks[0]["records"]], ranks, job.get("predicted_step_s"),
                       measured, tokens / measured)
    (out_dir / "report.json").write_text(json.dumps({
        "losses": report.losses, "predicted_step_s": report.predicted_step_s,
        "measured_step_s": report.measured_step_s, "prediction_error": report.prediction_error,
        "tokens_per_s": report.tokens_per_s,
        "ranks": [{k: v for k, v in r.items() if k != "records"} |
                  {"median_step_s": statistics.median(x["step_s"] for x in r["records"]),
                   "median_sync_s": statistics.median(x["sync_s"] for x in r["records"])} for r in ranks],
    }, indent=1))
    return report
