"""Every term the runtime pays is in the predicted step: move one measured value, the prediction
moves by exactly what the step-time model (docs/PLANNER.md) says it should — no more, no less."""

from __future__ import annotations

import dataclasses
import math

import pytest

from alloy.devices import DeviceProfile, Inventory, Link, LinkSpec
from alloy.devices.schema import MeasuredLayerTimes
from alloy.plan import Workload, make_plan
from alloy.plan.timing import (BACKWARD_SHARE, Layout, Replica, build_problem, gradient_bucket_bytes, replica_timing,
                               stage_params, step_timing, sync_cost, train_micro_batches)
from alloy.plan.transport import transport
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
              fast=None, bandwidth_bytes_per_s=1e9) -> Inventory:
    return Inventory(devices=[device("fast", 1e-3, **(fast or {})), device("slow", 3e-3, **(slow or {}))],
                     links=[Link(a="fast", b="slow", bandwidth_bytes_per_s=bandwidth_bytes_per_s, latency_s=latency_s)],
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


def gpu(node: str = "local", host_link_bytes_per_s: float = 2e9) -> dict:
    """A GPU profile's fields for `inventory(slow=..., fast=...)`."""
    return dict(kind="cuda", node=node, host_link_bytes_per_s=host_link_bytes_per_s)


BF16 = dataclasses.replace(WORK, dtype="bf16")


def bf16_problem(slow: dict, fast: dict, **links):
    inv = inventory(slow=slow, fast=fast, **links)
    inv = inv.model_copy(update={"devices": [d.model_copy(update={"matmul_flops": {"bf16": 1e10}})
                                             for d in inv.devices]})
    return build_problem(SPEC, inv, BF16)


def test_an_accelerators_host_copies_move_each_hop_as_the_runtime_sends_it():
    """gloo carries host tensors: a GPU stage's activations (fp32 in training, whatever the compute
    dtype) copy to the host, cross the link, copy back; each copy at the GPU's host-link rate.
    GPUs on two nodes: the transport rule keeps them on gloo (one node's go over NCCL, below)."""
    def step(slow_host_bytes_per_s):
        problem = bf16_problem(slow=gpu("b", slow_host_bytes_per_s), fast=gpu("a"))
        return step_timing(problem, PIPELINE).step_s

    m = train_micro_batches(8, 4, stages=2)
    moved = step(1e9) - step(2e9)
    activation_bytes = (8 / m) * WORK.seq_len * SPEC.hidden_size * 4  # a micro-batch's hidden states, fp32
    # the slow first stage's slot pays the send forward and the gradient back, m times
    assert moved == pytest.approx(2 * m * activation_bytes * (1 / 1e9 - 1 / 2e9), rel=1e-6)
    from alloy.plan.planner import describe

    plan = describe(bf16_problem(slow=gpu("b"), fast=gpu("a")), PIPELINE, "exact", 1, 0.0)
    (link,) = plan.links  # the plan says how its one hop travels, at the rate it priced
    assert (link.transport, link.through_host, link.message_bytes_per_element) == ("gloo", True, 4)
    assert link.bytes_per_s == pytest.approx(1 / (1 / 1e9 + 2 / 2e9)) and plan.collective_transport == "gloo"
    infer = make_plan(SPEC, inventory(slow=gpu(), fast=gpu()), Workload("infer", 1, 16, dtype="bf16", new_tokens=4))
    assert all(link.message_bytes_per_element == 2 for link in infer.links)  # decoding sends its bf16


# ---- the transport the runtime uses, priced as it moves the bytes (alloy.plan.transport) ---------

def test_the_transport_rule_puts_only_gpus_of_one_node_on_nccl():
    a0, a1 = device("a0", 1e-3, **gpu("a")), device("a1", 1e-3, **gpu("a"))
    b0, cpu = device("b0", 1e-3, **gpu("b")), device("cpu", 1e-3)
    assert transport([a0, a1]) == "nccl"
    assert transport([a0, a1], nccl_usable=False) == "gloo"  # a build without NCCL, or no CUDA there
    assert transport([a0, b0]) == "gloo"  # two nodes
    assert transport([a0, cpu]) == "gloo" and transport([a0, a1, cpu]) == "gloo"  # a CPU takes part
    assert transport([a0, a0]) == "gloo"  # NCCL refuses two ranks on one GPU
    assert transport([a0]) == "gloo" and transport([cpu, cpu.model_copy(update={"name": "cpu2"})]) == "gloo"


def test_an_nccl_hop_is_priced_at_the_link_rate_with_no_host_copy():
    """Two GPUs of one node send device to device: a hop costs bytes / link rate + latency, each
    way; the GPUs' host-link rate is no part of it. A CPU + GPU pipeline still pays the copy."""
    m = train_micro_batches(8, 4, stages=2)
    activation_bytes = (8 / m) * WORK.seq_len * SPEC.hidden_size * 4  # fp32 on the wire, as gloo
    problem = bf16_problem(slow=gpu(), fast=gpu())
    timing = replica_timing(problem, (1, 0), (0, 2, 4), 8, 4)
    assert timing.slot_s[0] - timing.compute_s[0] == pytest.approx(2 * (activation_bytes / 1e9 + 1e-3), rel=1e-12)

    def step(slow, fast, **links):
        return step_timing(bf16_problem(slow=slow, fast=fast, **links), PIPELINE).step_s

    assert step(gpu("local", 0.5e9), gpu("local", 0.5e9)) == step(gpu(), gpu())  # host copies: none
    moved = step(gpu(), gpu(), bandwidth_bytes_per_s=0.5e9) - step(gpu(), gpu())
    # ...and the tied embedding's two copies are summed over that link too (NCCL: not gloo's measured ring)
    tied_bytes = problem.costs.embed_params * problem.costs.dtype_bytes
    assert moved == pytest.approx((2 * m * activation_bytes + tied_bytes) * (1 / 0.5e9 - 1 / 1e9), rel=1e-6)
    # the slow first stage a GPU, the fast one a CPU: gloo, and the GPU's copy is in series
    moved = step(gpu("local", 1e9), {}) - step(gpu(), {})
    assert moved == pytest.approx(2 * m * activation_bytes * (1 / 1e9 - 1 / 2e9), rel=1e-6)


def test_an_nccl_all_reduce_has_no_host_copies():
    """Data parallel over two GPUs of one node reduces on the devices: the GPUs' host-link rate
    does not move the step; over a CPU and a GPU (gloo) each bucket copies out and back."""
    grad_bytes = SPEC.num_params() * 4
    assert math.ceil(grad_bytes / gradient_bucket_bytes(grad_bytes, overlap=True)) == 1  # one bucket, after

    def step(slow, fast, **terms):
        return step_s(inventory(slow=slow, fast=fast, **terms), DATA_PARALLEL)

    assert step(gpu("local", 0.5e9), gpu("local", 0.5e9)) == step(gpu(), gpu())
    assert step(gpu("local", 1e9), {}) - step(gpu(), {}) == pytest.approx(grad_bytes * 2 * (1 / 1e9 - 1 / 2e9),
                                                                         rel=1e-6)
    # calibration measures gloo's all-reduce on host tensors: NCCL's ring is priced on the GPUs' link
    slower_gloo = LinkSpec(bandwidth_bytes_per_s=0.1e9, latency_s=0.1)
    assert step(gpu(), gpu(), allreduce=slower_gloo) == step(gpu(), gpu())
    ring_bytes = 2 * (2 - 1) / 2 * grad_bytes
    moved = step(gpu(), gpu(), bandwidth_bytes_per_s=0.5e9) - step(gpu(), gpu())
    assert moved == pytest.approx(ring_bytes * (1 / 0.5e9 - 1 / 1e9), rel=1e-6)


def three_devices() -> Inventory:
    """Two GPUs of one node and a CPU."""
    devices = [device("g0", 1e-3, **gpu()), device("g1", 1e-3, **gpu()), device("cpu", 3e-3)]
    return Inventory(devices=devices, allreduce=LinkSpec(bandwidth_bytes_per_s=1e9, latency_s=2e-3))


def test_the_plan_records_each_links_transport_and_the_collectives():
    from alloy.plan.planner import describe

    plan = describe(bf16_problem(slow=gpu(), fast=gpu()), PIPELINE, "exact", 1, 0.0)
    (link,) = plan.links
    assert (link.transport, link.through_host, link.message_bytes_per_element) == ("nccl", False, 4)
    assert link.bytes_per_s == 1e9 and plan.collective_transport == "nccl"
    # a pipeline's messages go by its whole pipeline's transport: with a CPU in it, the GPU hop is gloo's
    problem = build_problem(SPEC, three_devices(), WORK)
    mixed = describe(problem, Layout((Replica((0, 1, 2), (0, 1, 2, 4), 8),), 4), "exact", 1, 0.0)
    assert [(l.a, l.b, l.transport, l.through_host) for l in mixed.links] == [
        ("g0", "g1", "gloo", True), ("g1", "cpu", "gloo", True)]
    # a GPU pipeline beside a CPU replica: its hop on NCCL, the step's collectives on gloo
    hybrid = describe(problem, Layout((Replica((0, 1), (0, 2, 4), 6), Replica((2,), (0, 4), 2)), 2), "exact", 1, 0.0)
    assert [(l.transport, l.through_host) for l in hybrid.links] == [("nccl", False)]
    assert hybrid.collective_transport == "gloo"
    # inference runs on alloy.infer's gloo ranks: no NCCL priced there
    decode = Workload("infer", 2, 16, dtype="bf16", new_tokens=4)
    infer = describe(build_problem(SPEC, inventory(slow=gpu(), fast=gpu()), decode), PIPELINE, "exact", 1, 0.0)
    assert [(l.transport, l.through_host) for l in infer.links] == [("gloo", True)]
    assert infer.collective_transport is None


def test_the_search_prices_a_pipeline_by_its_transport_as_the_step_time_model_does():
    from alloy.plan.search import Search

    problem = build_problem(SPEC, three_devices(), WORK)
    result = Search(problem).run((1, 2, 4))
    assert result.step_s == pytest.approx(step_timing(problem, result.layout).step_s, rel=1e-9)
    for _, layout in Search(problem).run((4,), keep=8).alternatives:
        assert math.isfinite(step_timing(problem, layout).step_s)


def test_alloy_plan_shows_the_transports():
    from rich.console import Console

    from alloy.plan.explain import plan_tables
    from alloy.plan.planner import describe

    plan = describe(build_problem(SPEC, inventory(slow=gpu(), fast=gpu()), WORK), PIPELINE, "exact", 1, 0.0)
    console = Console(record=True, width=200)
    console.print(plan_tables(plan))
    text = console.export_text()
    assert "link slow <-> fast: nccl device to device, 4-byte elements, 1 GB/s" in text
    assert "collectives (gradients, loss and norm): nccl" in text
