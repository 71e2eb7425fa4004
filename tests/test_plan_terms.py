"""Every term the runtime pays is in the predicted step: move one measured value, the prediction
moves by exactly what the step-time model (docs/PLANNER.md) says it should — no more, no less."""

from __future__ import annotations

import dataclasses
import math

import pytest

from alloy.devices import DeviceProfile, Inventory, Link, LinkSpec
from alloy.devices.schema import MeasuredLayerTimes
from alloy.plan import Workload, make_plan
from alloy.plan.timing import (BACKWARD_SHARE, Layout, Replica, build_problem, gradient_bucket_bytes, stage_params,
                               step_timing, sync_cost, train_micro_batches)
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
    calls = 1 + math.ceil(grad_bytes / gradient_bucket_bytes(grad_bytes, overlap=True))  # scalars, then buckets
    assert calls == 2  # a small model: one bucket, nothing to overlap
    assert moved == pytest.approx(calls * delta, rel=1e-9)


BIG = dataclasses.replace(SPEC, hidden_size=256, head_dim=64, intermediate_size=512, vocab_size=2048)


def big_step(bandwidth_bytes_per_s: float) -> tuple[float, float]:
    inv = inventory(allreduce=LinkSpec(bandwidth_bytes_per_s=bandwidth_bytes_per_s, latency_s=2e-3))
    problem = build_problem(BIG, inv, WORK)
    return step_timing(problem, DATA_PARALLEL).step_s, problem


def test_data_parallel_hides_all_but_the_last_bucket_behind_the_backward():
    grad_bytes = BIG.num_params() * 4
    bucket = gradient_bucket_bytes(grad_bytes, overlap=True)
    calls = math.ceil(grad_bytes / bucket)
    assert calls == 4
    last = grad_bytes - 3 * bucket
    # fast links: the backward covers the first three buckets; a slower ring costs the last one's bytes
    fast, problem = big_step(1e9)
    slower, _ = big_step(0.8e9)
    assert slower - fast == pytest.approx(last / 0.8e9 - last / 1e9, rel=1e-9)
    # slow links: the hidden buckets outlast the backward, and all of the bytes count
    window = step_timing(problem, DATA_PARALLEL).replicas[1].compute_s[0] * BACKWARD_SHARE * (1 - bucket / grad_bytes)
    slow_bw = 3 * bucket / window  # below this the three hidden buckets take longer than the window
    crawl, _ = big_step(slow_bw / 4)
    crawler, _ = big_step(slow_bw / 5)
    assert crawler - crawl == pytest.approx(grad_bytes * (5 - 4) / slow_bw, rel=1e-9)
    sync = sync_cost(problem, [(0,), (1,)])
    assert sync.hidden_s > 0 and sync.exposed_s > 0


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


def test_an_accelerators_host_copies_move_each_hop_as_the_runtime_sends_it():
    """gloo carries host tensors: a GPU stage's activations (fp32 in training, whatever the compute
    dtype) copy to the host, cross the link, copy back; each copy at the GPU's host-link rate."""
    gpu = dict(kind="cuda", host_link_bytes_per_s=2e9)
    slower = dict(kind="cuda", host_link_bytes_per_s=1e9)
    bf16 = dataclasses.replace(WORK, dtype="bf16")

    def step(slow, fast):
        inv = inventory(slow=slow, fast=fast)
        inv = inv.model_copy(update={"devices": [d.model_copy(update={"matmul_flops": {"bf16": 1e10}})
                                                 for d in inv.devices]})
        return step_timing(build_problem(SPEC, inv, bf16), PIPELINE).step_s

    m = train_micro_batches(8, 4, stages=2)
    moved = step(slower, gpu) - step(gpu, gpu)
    activation_bytes = (8 / m) * WORK.seq_len * SPEC.hidden_size * 4  # a micro-batch's hidden states, fp32
    # the slow first stage's slot pays the send forward and the gradient back, m times
    assert moved == pytest.approx(2 * m * activation_bytes * (1 / 1e9 - 1 / 2e9), rel=1e-6)
    from alloy.plan.planner import describe

    plan = describe(build_problem(SPEC, inventory(slow=gpu, fast=gpu), bf16), PIPELINE, "exact", 1, 0.0)
    (link,) = plan.links  # the plan says how its one hop travels, at the rate it priced
    assert (link.transport, link.through_host, link.message_bytes_per_element) == ("gloo", True, 4)
    assert link.bytes_per_s == pytest.approx(1 / (1 / 1e9 + 2 / 2e9)) and plan.collective_transport == "gloo"
    infer = make_plan(SPEC, inventory(slow=gpu, fast=gpu), Workload("infer", 1, 16, dtype="bf16", new_tokens=4))
    assert all(link.message_bytes_per_element == 2 for link in infer.links)  # decoding sends its bf16
