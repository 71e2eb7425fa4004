"""TrainJob: the worker's job survives its JSON round trip whole, a key it does not know is refused, and
older runs' documents still load."""

import json
import random

import pytest

from alloy.errors import CheckpointError
from alloy.runtime import Checkpointing, DataSource, JobError, OptimConfig, RunLayout, TrainJob
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=48, max_seq_len=64, tie_embeddings=True)
LAYOUT = RunLayout.of([[("cpu0", 0, 3), ("cpu1", 3, 4)], [("cpu2", 0, 4)]], (3, 1), (2, 1))


def _every_field_set(rng: random.Random) -> TrainJob:
    """A job with every field away from its default (so a field to_dict or from_dict drops shows)."""
    return TrainJob(
        spec=SPEC, layout=LAYOUT, steps=rng.randint(2, 99), seq_len=rng.randint(2, 64), out_dir="/tmp/run/workers",
        data=DataSource("tokens", seed=rng.randint(1, 9), path="train.bin", start=5, end=900),
        seed=rng.randint(1, 99), optim=OptimConfig(lr=rng.random(), betas=(0.8, 0.9), weight_decay=0.1, eps=1e-6,
                                                   warmup_steps=3, min_lr_ratio=0.1, grad_clip=1.0),
        pipeline_schedule="gpipe", devices={"cpu0": {"name": "cpu0", "kind": "cpu"}}, init_dir="/tmp/base",
        threads=2, timeout_s=rng.uniform(1, 99), predicted_step_s=rng.random(),
        predicted_terms={"compute_s": 0.5, "allreduce_s": 0.25, "optimizer_s": 0.125}, grad_accum=2,
        precision="bf16", param_dtype="fp64", activation_checkpointing=True, lora={"rank": 8, "alpha": 16.0},
        val_data=DataSource("tokens", seed=2, path="train.bin", start=900), eval_every=7, eval_batches=3,
        checkpoint=Checkpointing(dir="/tmp/run/checkpoints", every=5, keep_last=2), resume=True, stop_at=4,
        metrics_path="/tmp/run/metrics.jsonl", max_restarts=1)


def test_a_job_survives_its_json_round_trip():
    job = _every_field_set(random.Random())
    plain = TrainJob(spec=SPEC, layout=LAYOUT, steps=1, seq_len=1, out_dir="")
    assert [f for f in job.to_dict() if getattr(job, f) == getattr(plain, f)] == ["spec", "layout"]
    assert TrainJob.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    least = TrainJob(spec=SPEC, layout=LAYOUT, steps=3, seq_len=8, out_dir="out")
    assert TrainJob.from_dict(json.loads(json.dumps(least.to_dict()))) == least


def test_an_unknown_key_is_refused_by_name():
    doc = _every_field_set(random.Random(0)).to_dict() | {"eval_evry": 10}  # a typo for eval_every
    with pytest.raises(JobError, match="eval_evry"):
        TrainJob.from_dict(doc)


def test_a_missing_key_is_refused_by_name():
    doc = _every_field_set(random.Random(0)).to_dict()
    del doc["seq_len"]
    with pytest.raises(JobError, match="seq_len"):
        TrainJob.from_dict(doc)


def test_a_job_written_before_the_runtime_held_the_plans_stage_still_loads():
    """Job documents and checkpoint manifests of older runs wrote each stage as device, first, last,
    embed, head: they load as the same layout, unpredicted."""
    doc = json.loads(json.dumps(TrainJob(spec=SPEC, layout=LAYOUT, steps=3, seq_len=8, out_dir="out").to_dict()))
    doc["layout"]["replicas"] = [[{"device": "cpu0", "first": 0, "last": 3, "embed": True, "head": False},
                                  {"device": "cpu1", "first": 3, "last": 4, "embed": False, "head": True}],
                                 [{"device": "cpu2", "first": 0, "last": 4, "embed": True, "head": True}]]
    old = TrainJob.from_dict(doc)
    assert old.layout == LAYOUT
    assert [(s.rank, s.replica, s.position) for r in old.layout.replicas for s in r] == [(0, 0, 0), (1, 0, 1), (2, 1, 0)]


def test_a_plans_stages_run_as_written_and_a_checkpoint_matches_on_placement_alone(tmp_path):
    """The runtime holds the plan's own Stage, predictions and all, through the job's JSON; a
    checkpoint is compatible with the same layers, devices and shares whatever was predicted."""
    from alloy.devices import DeviceProfile, Inventory
    from alloy.plan import Workload
    from alloy.plan.planner import describe
    from alloy.plan.timing import Layout, Replica, build_problem
    from alloy.runtime.checkpoint import check_compatible

    devices = [DeviceProfile(name=f"cpu{i}", kind="cpu", memory_bytes=2**33, matmul_flops={"fp32": 1e11},
                             memory_bandwidth_bytes_per_s=1e10) for i in range(3)]
    problem = build_problem(SPEC, Inventory(devices=devices), Workload("train", batch_size=4, seq_len=8, dtype="fp32"))
    plan = describe(problem, Layout((Replica((0, 1), (0, 3, 4), 3), Replica((2,), (0, 4), 1)), micro_batches=2),
                    "exact", 1, 0.0)
    layout = RunLayout.from_plan(plan)
    layout.validate(SPEC)
    assert [s for r in layout.replicas for s in r] == plan.stages and layout.world_size == 3
    assert any(s.predicted_busy_s > 0 for s in plan.stages)
    job = TrainJob(spec=SPEC, layout=layout, steps=3, seq_len=8, out_dir="out")
    assert TrainJob.from_dict(json.loads(json.dumps(job.to_dict()))).layout == layout

    unpredicted = RunLayout.of([[(s.device, *s.layers) for s in r] for r in layout.replicas], layout.batch_shares,
                               layout.micro_batches)
    assert unpredicted != layout and unpredicted.placement() == layout.placement()
    check_compatible({"spec": SPEC.to_dict(), "layout": unpredicted.to_dict()}, SPEC, layout, tmp_path)
    other = RunLayout(layout.replicas, layout.batch_shares, tuple(m + 1 for m in layout.micro_batches))
    with pytest.raises(CheckpointError, match="different plan"):
        check_compatible({"spec": SPEC.to_dict(), "layout": other.to_dict()}, SPEC, layout, tmp_path)
