"""The process `torchrun` starts for each rank: `python -m alloy.runtime.worker JOB.json`.

It reads the job (an alloy.runtime.job.TrainJob: spec, layout, devices, data, steps...), takes
its rank's stage, enters its emulated CPU slice or its device, and trains: step records and
final shard always, and, when the job asks, evaluation, metrics (rank 0, one JSON line per
step), checkpoints and resume.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from alloy.devices import DeviceProfile, torch_device
from alloy.errors import AlloyError
from alloy.runtime import checkpoint as ckpt
from alloy.runtime.engine import StageRunner
from alloy.runtime.job import TrainJob
from alloy.runtime.launch import init_gloo, nccl_usable
from alloy.runtime.layout import PlanMismatchError, job_transports


def _slice_context(profile: DeviceProfile | None):
    from alloy.devices.emulate import slice_context

    return slice_context(None if profile is None else profile.cpu_slice)


def _set_threads(threads: int | None, profile: DeviceProfile | None) -> None:
    if threads:
        torch.set_num_threads(threads)
    elif profile is None or profile.kind == "cpu":
        # CPU workers of one node share its cores; oversubscribing them slows every rank.
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // local))


class Trainer:
    """The training loop of one rank."""

    def __init__(self, job: TrainJob, rank: int):
        self.job, self.rank = job, rank
        self.spec, self.layout = job.spec, job.layout
        self.info = self.layout.rank(rank)
        profiles = {name: DeviceProfile.model_validate(p) for name, p in job.devices.items()}
        self.profile = profiles.get(self.info.stage.device)
        self.device = torch.device("cpu") if self.profile is None else torch_device(self.profile.name, self.profile.kind)
        # the plan's transports (alloy.plan.transport), where this torch build and machine can run NCCL
        self.transports = job_transports(self.layout, profiles, nccl_usable())
        self.timeout = timedelta(seconds=job.timeout_s)
        self.steps, self.seq_len, self.accum = job.steps, job.seq_len, job.grad_accum
        self.ckpt_root = Path(job.checkpoint.dir) if job.checkpoint else None
        self.metrics_path = Path(job.metrics_path) if job.metrics_path else None

    def run(self) -> None:
        job, rank, layout = self.job, self.rank, self.layout
        before_bytes = _rss_bytes()  # the process before its model: imports, the process group
        runner = StageRunner(
            self.spec, layout, rank, device=self.device, seed=job.seed, init_dir=job.init_dir, optim=job.optim,
            pipeline_schedule=job.pipeline_schedule, precision=job.precision,
            activation_checkpointing=job.activation_checkpointing, timeout=self.timeout,
            param_dtype=job.param_dtype, lora=job.lora, transports=self.transports,
        )
        # torchrun restarted every rank after one died: go on from the last complete checkpoint
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        start_step = self._resume(runner) if job.resume or restarted else 0
        if restarted and self.rank == 0 and self.metrics_path and self.metrics_path.is_file():
            kept = [l for l in self.metrics_path.read_text().splitlines() if l.strip()
                    and json.loads(l)["step"] <= start_step]  # the steps after it run again
            fresh = self.metrics_path.with_suffix(".restart")
            fresh.write_text("".join(l + "\n" for l in kept))
            os.replace(fresh, self.metrics_path)  # whole: the launcher may be reading it right now
        stop = min(self.steps, job.stop_at or self.steps)
        records = []
        for step in range(start_step, stop):
            batches = [job.data.batch(step * self.accum + k, layout.global_batch, self.seq_len,
                                      self.spec.vocab_size) for k in range(self.accum)]
            record = runner.step(step, batches, runner.optim.lr_at(step, self.steps))
            records.append(asdict(record))
            done = step + 1
            line = {"step": done, "loss": record.loss, "lr": record.lr, "grad_norm": record.grad_norm,
                    **self._step_times(records)}
            if job.val_data and (done % job.eval_every == 0 or done == stop):
                line |= self._evaluate(runner)
            if job.checkpoint and (done % job.checkpoint.every == 0 or done == stop):
                self._save(runner, done)
            self._log(line)
        out_dir = Path(job.out_dir)
        save_file(runner.named_state(), str(out_dir / f"rank{rank}.safetensors"))
        (out_dir / f"rank{rank}.json").write_text(json.dumps({
            "rank": rank, "replica": self.info.replica, "stage": self.info.stage_index,
            "device": self.info.stage.device, "layers": list(self.info.stage.layers),
            "start_step": start_step, "records": records, "transport": runner.transport,
            # what the job added at its peak, for checking the plan's memory estimate
            "memory": {"before_bytes": before_bytes, "peak_bytes": _peak_rss_bytes()},
        }))
        dist.barrier()

    def _step_times(self, records: list[dict]) -> dict:
        """The step's time as the job sees it — start to start on this rank, which the collectives
        hold to every rank's pace — and each device's own time for the step before it (carried by
        the step's scalar all-reduce: metrics add no collective, so no barrier, to a step)."""
        last = records[-1]
        step_s = last["started_s"] - records[-2]["started_s"] if len(records) > 1 else last["step_s"]
        tokens = self.layout.global_batch * self.seq_len * self.accum
        devices = [info.stage.device for info in self.layout.ranks()]
        line = {"step_s": step_s, "tokens_per_s": tokens / step_s, "predicted_step_s": self.job.predicted_step_s}
        if len(records) > 1:
            line["device_step_s"] = dict(zip(devices, last["previous_step_s"]))
        return line

    def _evaluate(self, runner: StageRunner) -> dict:
        val_data = self.job.val_data
        losses = [runner.evaluate(val_data.batch(i, self.layout.global_batch, self.seq_len, self.spec.vocab_size))
                  for i in range(self.job.eval_batches)]
        loss = sum(losses) / len(losses)
        return {"eval_loss": loss, "eval_ppl": float(torch.tensor(loss).exp())}

    def _save(self, runner: StageRunner, step: int) -> None:
        info = {"replica": self.info.replica, "stage": self.info.stage_index, "device": self.info.stage.device,
                "layers": list(self.info.stage.layers)}
        ckpt.save_rank(self.ckpt_root, step, self.rank, runner.model, runner.optimizer, info)
        dist.barrier()
        if self.rank == 0:
            ckpt.finalize(self.ckpt_root, step, self.spec, self.layout, self.job.checkpoint.keep_last,
                          {"total_steps": self.steps, "seq_len": self.seq_len, "data": asdict(self.job.data),
                           "lora": self.job.lora})
        dist.barrier()

    def _resume(self, runner: StageRunner) -> int:
        found = ckpt.complete_checkpoints(self.ckpt_root) if self.ckpt_root else []
        if not found:
            return 0
        latest = found[-1]
        ckpt.check_compatible(ckpt.read_manifest(latest), self.spec, self.layout, latest)
        record = ckpt.load_rank(latest, self.rank, runner.model, runner.optimizer)
        return int(record["step"])

    def _log(self, line: dict) -> None:
        if self.rank == 0 and self.metrics_path:
            with open(self.metrics_path, "a") as handle:
                handle.write(json.dumps(line | {"time": time.time()}) + "\n")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def run_worker(job: TrainJob) -> None:
    from alloy.runtime.launch import die_with_parent

    die_with_parent()  # torchrun gone (killed, or its launcher was): this rank goes too
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    job.layout.validate(job.spec)
    if world != job.layout.world_size:
        raise PlanMismatchError(f"the job has {world} ranks but the plan needs {job.layout.world_size}")
    trainer = Trainer(job, rank)
    _set_threads(job.threads, trainer.profile)
    with ExitStack() as stack:
        stack.enter_context(_slice_context(trainer.profile))
        if trainer.device.type == "cuda":
            torch.cuda.set_device(trainer.device)  # NCCL's communicators and streams are this rank's GPU's
        init_gloo(nccl=trainer.transports.nccl, timeout=trainer.timeout)
        stack.callback(dist.destroy_process_group)
        trainer.run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = os.environ.get("RANK", "?")
    try:
        run_worker(TrainJob.from_dict(json.loads(Path(argv[0]).read_text())))
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
