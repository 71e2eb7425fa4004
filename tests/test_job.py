"""TrainJob: the worker's job survives its JSON round trip whole, and a key it does not know is refused."""

import json
import random

import pytest

from alloy.runtime import Checkpointing, DataSource, JobError, OptimConfig, RunLayout, Stage, TrainJob
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=48, max_seq_len=64, tie_embeddings=True)
LAYOUT = RunLayout(((Stage("cpu0", 0, 3, True, False), Stage("cpu1", 3, 4, False, True)),
                    (Stage("cpu2", 0, 4, True, True),)), (3, 1), (2, 1))


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
