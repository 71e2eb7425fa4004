"""The planner's expert placement for MoE inference (alloy.plan.experts): when it is chosen, what
it is priced from, and the plan document it writes."""

from __future__ import annotations

import pytest

from alloy.devices import DeviceProfile, Inventory, Link
from alloy.plan import Plan, Workload, make_plan
from alloy.plan.experts import best_offload, price
from alloy.plan.planner import layout_line
from alloy.plan.timing import build_problem, decode_token_s
from alloy.checkpoint import resolve_spec
from alloy.spec import ModelSpec

GIB = 2**30
MIXTRAL = ModelSpec.from_hf_config(dict(
    model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=32768))
QWEN3_MOE = ModelSpec.from_hf_config(dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960))
WORK = Workload("infer", 1, 512, dtype="bf16", new_tokens=128)


def gpu_and_cpu(gpu_gib=24, latency_s=20e-6):
    gpu = DeviceProfile(name="gpu", kind="cuda", node="n0", memory_bytes=gpu_gib * GIB, matmul_flops={"bf16": 150e12},
                        memory_bandwidth_bytes_per_s=900e9)
    cpu = DeviceProfile(name="cpu", kind="cpu", node="n0", memory_bytes=128 * GIB, matmul_flops={"bf16": 1e12},
                        memory_bandwidth_bytes_per_s=60e9)
    return Inventory(devices=[gpu, cpu], links=[Link(a="gpu", b="cpu", bandwidth_bytes_per_s=25e9,
                                                      latency_s=latency_s)])


@pytest.mark.parametrize("spec", [MIXTRAL, QWEN3_MOE], ids=["mixtral", "qwen3-moe"])
def test_a_small_fast_device_keeps_attention_and_the_big_one_takes_experts(spec):
    inventory = gpu_and_cpu()
    plan = make_plan(spec, inventory, WORK)
    layers_only = make_plan(spec, inventory, WORK, expert_offload=False)
    stage = plan.stages[0]
    assert len(plan.stages) == 1 and stage.device == "gpu" and stage.layers == (0, spec.num_layers)
    assert stage.experts is not None and stage.experts.device == "cpu" and stage.experts.rank == 1
    assert plan.world_size == 2 and plan.unused_devices == []
    assert stage.predicted_memory_bytes <= stage.memory_capacity_bytes
    assert stage.experts.predicted_memory_bytes <= stage.experts.memory_capacity_bytes
    assert all(s.experts is None for s in layers_only.stages) and len(layers_only.stages) == 2
    assert plan.predicted.step_s < layers_only.predicted.step_s
    assert "experts" in layout_line(plan) and "experts" in plan.bottleneck
    # the fewest experts moved that fit: one more layer's experts on the GPU would overflow it
    problem = build_problem(spec, inventory, WORK)
    start = stage.experts.layers[0]
    assert not price(problem, 0, 1, start + 1).fits or price(problem, 0, 1, start + 1).step_s >= plan.predicted.step_s


def test_never_chosen_where_it_cannot_help():
    # the GPU holds the whole model: moving experts to the CPU only adds its slow reads
    plan = make_plan(MIXTRAL, gpu_and_cpu(gpu_gib=128), WORK)
    assert all(s.experts is None for s in plan.stages) and [s.device for s in plan.stages] == ["gpu"]
    # a dense model has no experts to place; a training plan never places them
    dense = make_plan(resolve_spec("llama-3.1-8b"), gpu_and_cpu(gpu_gib=8), WORK)
    assert all(s.experts is None for s in dense.stages)
    assert best_offload(build_problem(MIXTRAL, gpu_and_cpu(), Workload("train", 1, 512))) is None


def test_the_round_trips_are_priced_from_the_link():
    """Each MoE layer's experts elsewhere cost two messages a token: raising the link's latency by
    d moves the prediction by 2 x moved layers x (new tokens + 1 prefill) x d."""
    base = build_problem(MIXTRAL, gpu_and_cpu(latency_s=20e-6), WORK)
    slow = build_problem(MIXTRAL, gpu_and_cpu(latency_s=1020e-6), WORK)
    start = best_offload(base).start
    moved = MIXTRAL.num_layers - start
    delta = price(slow, 0, 1, start).step_s - price(base, 0, 1, start).step_s
    assert delta == pytest.approx(2 * moved * (WORK.new_tokens + 1) * 1e-3, rel=1e-9)


def test_a_moe_decode_step_reads_only_the_experts_it_picks():
    """Batch 1 reads k of E experts a layer; a big batch reads nearly all (E(1 - (1-k/E)^b))."""
    p = build_problem(MIXTRAL, gpu_and_cpu(), WORK)
    h, ff, E, k = 4096, 14336, 8, 2
    expert_bytes = 3 * h * ff * 2  # gate, up, down in bf16
    L = MIXTRAL.num_layers
    for batch in (1, 4, 64):
        read_s = decode_token_s(p, 1, 0, L, batch)
        dense_read_bytes = MIXTRAL.num_params() * 2 - L * expert_bytes * E * (1 - k / E) ** batch
        kv_bytes = batch * float(p.prefix_kv_read_bytes[L])
        flops_s = batch * float(p.prefix_decode_flops[L] + p.costs.head_decode_flops_per_sample) / 1e12
        assert read_s == pytest.approx(max((dense_read_bytes + kv_bytes) / 60e9, flops_s), rel=1e-9)


def test_the_plan_document_round_trips_with_experts(tmp_path):
    plan = make_plan(MIXTRAL, gpu_and_cpu(), WORK)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan and again.stages[0].experts.layers == plan.stages[0].experts.layers
    assert again.expert_ranks == [plan.stages[0].experts]


def test_inference_prices_messages_at_the_idle_latency_and_training_after_a_burst():
    """Decoding ranks take turns (a message finds its receiver waiting), training ranks send right
    after a backward: the link's two measured latencies, each where it applies."""
    inventory = gpu_and_cpu(latency_s=5e-3)
    inventory = inventory.model_copy(update={"links": [inventory.links[0].model_copy(update={"idle_latency_s": 1e-4})]})
    assert build_problem(MIXTRAL, inventory, WORK).link_latency_s[0, 1] == 1e-4
    assert build_problem(MIXTRAL, inventory, Workload("train", 1, 512)).link_latency_s[0, 1] == 5e-3
    assert build_problem(MIXTRAL, gpu_and_cpu(latency_s=5e-3), WORK).link_latency_s[0, 1] == 5e-3  # none measured
