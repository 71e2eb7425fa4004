"""Every term the runtime pays is in the predicted step: move one measured value, the prediction
moves by exactly what the step-time model (docs/PLANNER.md) says it should — no more, no less."""

from __future__ import annotations

import math

import pytest

from alloy.devices import DeviceProfile, Inventory, Link, LinkSpec
from alloy.devices.schema import MeasuredLayerTimes
from alloy.plan import Workload, make_plan
from alloy.plan.timing import (GRADIENT_BUCKET_BYTES, Layout, Replica, build_problem, stage_params, step_timing,
                               train_micro_batches)
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, max_seq_len=128, tie_embeddings=True)
WORK = Workload("train", batch_size=8, seq_len=32, dtype="fp32")


def device(name: str, layer_s: float, **extra) -> DeviceProfile:
    times = MeasuredLayerTimes(hidden_size=SPEC.hidden_size, num_layers=SPEC.num_layers, phase="train",
                               batch=[1.0, 8.0], layer_s=[layer_s, 8 * layer_s], first_s=[1e-4, 8e-4],
                               last_s=[5e-4, 4e-3])
    values = dict(name=name, kind="cpu", memory_bytes=2**34, matmul_flops={"fp32": 1e10},
                  memory_bandwidth_bytes_per_s=1e10, measured=True, layer_times=[times],
                  optimizer_s_per_param=2e-9, micro_batch_overhead_s=1e-4) | extra
    return DeviceProfile(**values)


def inventory(latency_s=1e-3, allreduce=LinkSpec(bandwidth_bytes_per_s=1e9, latency_s=2e-3), slow=None,
              fast=None) -> Inventory:
    return Inventory(devices=[device("fast", 1e-3, **(fast or {})), device("slow", 3e-3, **(slow or {}))],
                     links=[Link(a="fast", b="slow", bandwidth_bytes_per_s=1e9, latency_s=latency_s)],
                     allreduce=allreduce, startup_s=4.0)


PIPELINE = Layout((Replica((1, 0), (0, 2, 4), 8),), micro_batches=4)  # slow first: its slot paces
DATA_PARALLEL = Layout((Replica((0,), (0, 4), 5), Replica((1,), (0, 4), 3)), micro_batches=1)  # slow paces


def step_s(inv: Inventory, layout: Layout) -> float:
    return step_timing(build_problem(SPEC, inv, WORK), layout).step_s


def test_link_latency_moves_the_pipeline_by_two_hops_per_micro_batch():
    delta = 5e-4
    m = train_micro_batches(8, 4, stages=2)
    moved = step_s(inventory(latency_s=1e-3 + delta), PIPELINE) - step_s(inventory(), PIPELINE)
    # the slow first stage sends activations forward and receives gradients back: two messages a
    # micro-batch in its slot, which is the pipeline's largest, so m + 0 fill slots each pay it
    assert moved == pytest.approx(2 * delta * m, rel=1e-9)


def test_allreduce_latency_moves_data_parallel_by_each_call():
    delta = 1e-3
    moved = step_s(inventory(allreduce=LinkSpec(bandwidth_bytes_per_s=1e9, latency_s=2e-3 + delta)),
                   DATA_PARALLEL) - step_s(inventory(), DATA_PARALLEL)
    grad_bytes = SPEC.num_params() * 4
    calls = 1 + math.ceil(grad_bytes / GRADIENT_BUCKET_BYTES)  # the scalars, then the gradient buckets
    assert moved == pytest.approx(calls * delta, rel=1e-9)


def test_allreduce_bandwidth_moves_data_parallel_by_the_ring_bytes():
    half = inventory(allreduce=LinkSpec(bandwidth_bytes_per_s=0.5e9, latency_s=2e-3))
    moved = step_s(half, DATA_PARALLEL) - step_s(inventory(), DATA_PARALLEL)
    ring_bytes = 2 * (2 - 1) / 2 * SPEC.num_params() * 4
    assert moved == pytest.approx(ring_bytes / 0.5e9 - ring_bytes / 1e9, rel=1e-9)


def test_optimizer_rate_moves_the_step_by_the_pacing_replicas_update():
    delta = 3e-9
    problem = build_problem(SPEC, inventory(), WORK)
    moved = step_s(inventory(slow={"optimizer_s_per_param": 2e-9 + delta}), DATA_PARALLEL) - step_s(
        inventory(), DATA_PARALLEL)
    assert moved == pytest.approx(float(stage_params(problem, 0, 4)) * delta, rel=1e-9)  # every parameter
    # the faster replica's update hides behind the slower replica's work
    assert step_s(inventory(fast={"optimizer_s_per_param": 2e-9 + delta}), DATA_PARALLEL) == pytest.approx(
        step_s(inventory(), DATA_PARALLEL), rel=1e-12)


def test_micro_batch_overhead_moves_every_slot_of_a_pipeline():
    delta = 2e-4
    both = {"micro_batch_overhead_s": 1e-4 + delta}
    moved = step_s(inventory(fast=both, slow=both), PIPELINE) - step_s(inventory(), PIPELINE)
    m = train_micro_batches(8, 4, stages=2)
    assert moved == pytest.approx(delta * (2 + (m - 1)), rel=1e-9)  # both slots once, the largest m - 1 more
    # ...and a one-stage replica runs no pipeline schedule: its overhead is not charged
    assert step_s(inventory(fast=both, slow=both), DATA_PARALLEL) == pytest.approx(step_s(inventory(), DATA_PARALLEL))


def test_measured_layer_time_moves_the_compute_of_the_stage_that_paces():
    slower = inventory(slow={"layer_times": [device("slow", 4e-3).layer_times[0]]})
    moved = step_s(slower, DATA_PARALLEL) - step_s(inventory(), DATA_PARALLEL)
    assert moved == pytest.approx(4 * (4e-3 - 3e-3) * 3, rel=1e-9)  # 4 layers at a share of 3 samples


def test_the_plan_document_carries_the_terms_and_the_startup():
    plan = make_plan(SPEC, inventory(), WORK)
    p = plan.predicted
    assert p.startup_s == 4.0 and p.optimizer_s > 0
    assert p.step_s > p.allreduce_s + p.optimizer_s
