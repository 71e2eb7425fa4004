"""`run(plan, ...)`: train for some steps exactly as a Plan says, and report what was measured.

The small API the training front-ends build on: it turns the Plan into a TrainJob, starts
the workers with torchrun, and reads back each rank's step records and final shard.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from alloy.runtime.engine import PIPELINE_SCHEDULES
from alloy.runtime.job import TrainJob
from alloy.runtime.launch import Rendezvous, launch
from alloy.runtime.layout import PlanMismatchError, RunLayout
from alloy.spec import ModelSpec


WARN_ERROR = 0.25  # a measured step this far off its prediction is reported, naming the term
TERM_NAMES = {"compute_s": "the layers' forward and backward (and pipeline waits)",
              "allreduce_s": "the collectives (gradient all-reduce, loss and norm)",
              "optimizer_s": "the optimizer update"}


@dataclass
class RunReport:
    out_dir: Path
    losses: list[float]  # global mean loss per step
    ranks: list[dict]  # per rank: device, layers, per-step records
    predicted_step_s: float | None
    measured_step_s: float  # median step period after the first step (see measured_step_s)
    tokens_per_s: float
    notes: list[str] = field(default_factory=list)

    predicted_terms: dict | None = None  # the plan's compute_s / allreduce_s / optimizer_s

    def rank_times(self, info: dict) -> dict[str, float]:
        """One rank's median step, sync, update and compute (the step less the other two) after warm-up."""
        records = info["records"][1:] or info["records"]
        times = {k: statistics.median(r.get(k, 0.0) for r in records) for k in ("step_s", "sync_s", "optimizer_s")}
        return times | {"compute_s": times["step_s"] - times["sync_s"] - times["optimizer_s"]}

    def measured_terms(self) -> dict[str, float]:
        """The step split as the plan splits it, from the rank that computed longest (it waits
        least at the collectives, so its sync time is the collectives' own)."""
        per_rank = [self.rank_times(info) for info in self.ranks]
        slowest = max(per_rank, key=lambda t: t["compute_s"])
        between_steps_s = max(0.0, self.measured_step_s - slowest["step_s"])  # the metrics gather, the next batch
        return {"compute_s": slowest["compute_s"],
                "allreduce_s": slowest["sync_s"] + between_steps_s,
                "optimizer_s": max(t["optimizer_s"] for t in per_rank)}

    def off_term(self) -> str | None:
        """A warning when the measured step is over WARN_ERROR off the prediction, naming the
        term of the step that is furthest off; None when the prediction held."""
        error = self.prediction_error
        if error is None or error <= WARN_ERROR:
            return None
        line = (f"measured {self.measured_step_s:.3g} s/step against {self.predicted_step_s:.3g} s predicted "
                f"({error:.0%} off)")
        if not self.predicted_terms:
            return line
        measured = self.measured_terms()
        term = max(measured, key=lambda k: abs(measured[k] - self.predicted_terms.get(k, 0.0)))
        return (f"{line}; furthest off: {TERM_NAMES[term]}, {self.predicted_terms.get(term, 0.0):.3g} s predicted, "
                f"{measured[term]:.3g} s measured")

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


def job_document(spec: ModelSpec, layout: RunLayout, *, out_dir: str | Path, **fields) -> TrainJob:
    """The job every worker runs (`fields`: see TrainJob), checked against the model."""
    job = TrainJob(spec=spec, layout=layout, out_dir=str(out_dir), **fields)
    layout.validate(spec)
    if job.pipeline_schedule not in PIPELINE_SCHEDULES:
        raise PlanMismatchError(f"pipeline schedule {job.pipeline_schedule!r} is not one of "
                                f"{', '.join(PIPELINE_SCHEDULES)}")
    if job.seq_len > spec.max_seq_len:
        raise PlanMismatchError(f"seq_len {job.seq_len} exceeds the model's maximum {spec.max_seq_len}")
    missing = {s.device for r in layout.replicas for s in r} - set(job.devices) if job.devices else set()
    if missing:
        raise PlanMismatchError(f"the plan's stages use devices it does not describe: {', '.join(sorted(missing))}")
    return job


def run(plan, *, steps: int, out_dir: str | Path, spec: ModelSpec | None = None, seq_len: int | None = None,
        rdzv: Rendezvous = Rendezvous(), progress=None, **fields) -> RunReport:
    """Execute an `alloy.plan.Plan` for `steps` optimizer steps on this node's share of ranks.
    `fields` are the job's other settings (see TrainJob); its `timeout_s` also bounds the whole run."""
    plan_spec = ModelSpec.from_dict(plan.model.spec)
    if spec is not None and spec != plan_spec:
        changed = next(k for k, v in spec.to_dict().items() if plan_spec.to_dict()[k] != v)
        raise PlanMismatchError(f"the plan was made for a different model ({changed}: "
                                f"{plan_spec.to_dict()[changed]} in the plan, {spec.to_dict()[changed]} given)")
    layout = RunLayout.from_plan(plan)
    job = job_document(plan_spec, layout, steps=steps, seq_len=seq_len or plan.seq_len, out_dir=out_dir,
                       devices={d.name: d.model_dump() for d in plan.devices},
                       predicted_step_s=plan.predicted.step_s, predicted_terms=predicted_terms(plan), **fields)
    return run_job(job, rdzv=rdzv, timeout_s=job.timeout_s, progress=progress)


def predicted_terms(plan) -> dict[str, float]:
    p = plan.predicted
    return {"compute_s": p.step_s - p.allreduce_s - p.optimizer_s, "allreduce_s": p.allreduce_s,
            "optimizer_s": p.optimizer_s}


def run_job(job: TrainJob, *, rdzv: Rendezvous = Rendezvous(), timeout_s: float = 600.0,
            progress=None) -> RunReport:
    """Launch this node's workers and wait at most `timeout_s` for them; `progress(line)` is
    called with each metrics line as it lands."""
    layout = job.layout
    if layout.world_size % rdzv.nnodes:
        raise PlanMismatchError(f"{layout.world_size} ranks do not split evenly over {rdzv.nnodes} nodes")
    launch(job, layout.world_size // rdzv.nnodes, rdzv=rdzv, timeout_s=timeout_s, progress=progress,
           max_restarts=job.max_restarts)
    return read_report(job)


def measured_step_s(ranks: list[dict]) -> float:
    """The step period: median time from one step's start to the next on rank 0 (every rank keeps
    the same pace, held together by the collectives), so what a step costs between its optimizer
    update and the next forward (metrics, the next batch) counts too. Step 0 pays warm-up and is
    left out; with too few steps for two periods, the slowest rank's own step time."""
    starts = [r.get("started_s") for r in ranks[0]["records"]]
    if len(starts) >= 3 and all(starts):
        return statistics.median(b - a for a, b in zip(starts[1:], starts[2:]))
    records = range(len(ranks[0]["records"]))
    slowest = [max(r["records"][i]["step_s"] for r in ranks) for i in records]
    return statistics.median(slowest[1:] if len(slowest) > 1 else slowest)


def read_report(job: TrainJob) -> RunReport:
    out_dir = Path(job.out_dir)
    layout = job.layout
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(layout.world_size)]
    steps = len(ranks[0]["records"])
    if steps == 0:
        raise PlanMismatchError(f"{out_dir}: the run took no step (it was already at step {ranks[0]['start_step']})")
    measured = measured_step_s(ranks)
    tokens = layout.global_batch * job.seq_len * job.grad_accum
    report = RunReport(out_dir, [rec["loss"] for rec in ranks[0]["records"]], ranks, job.predicted_step_s,
                       measured, tokens / measured, predicted_terms=job.predicted_terms)
    (out_dir / "report.json").write_text(json.dumps({
        "losses": report.losses, "predicted_step_s": report.predicted_step_s,
        "measured_step_s": report.measured_step_s, "prediction_error": report.prediction_error,
        "tokens_per_s": report.tokens_per_s, "predicted_terms": report.predicted_terms,
        "measured_terms": report.measured_terms(), "warning": report.off_term(),
        "ranks": [{k: v for k, v in r.items() if k != "records"} |
                  {"median_step_s": statistics.median(x["step_s"] for x in r["records"]),
                   "median_sync_s": statistics.median(x["sync_s"] for x in r["records"])} for r in ranks],
    }, indent=1))
    return report
