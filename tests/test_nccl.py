"""Transport as planned: the runtime opens its groups by the rule the planner priced
(alloy.plan.transport) — NCCL among GPUs of one node, gloo where a CPU takes part.

The rule's pricing is tested in tests/test_plan_terms.py. Here: which transport each group of a job
gets, that a CPU run records the gloo the plan recorded, and on a machine with two GPUs, that a
pipeline and data-parallel replicas over NCCL train exactly as one process does (NCCL refuses two
ranks on one GPU, so with fewer they skip)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from alloy.devices import DeviceProfile, Inventory
from alloy.plan import Workload
from alloy.plan.planner import describe
from alloy.plan.timing import Layout, Replica, build_problem
from alloy.runtime import DataSource, OptimConfig, RunLayout, reference_run, run
from alloy.runtime.launch import nccl_usable
from alloy.runtime.layout import job_transports
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=48, max_seq_len=64, tie_embeddings=True)
STEPS, SEQ, BATCH = 3, 8, 4
DATA = DataSource("random", seed=3)
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1)
PIPELINE = Layout((Replica((0, 1), (0, 3, 6), BATCH),), micro_batches=2)
DATA_PARALLEL = Layout((Replica((0,), (0, 6), 3), Replica((1,), (0, 6), 1)), micro_batches=1)  # uneven shares


def profile(name: str, kind: str, node: str = "local") -> DeviceProfile:
    return DeviceProfile(name=name, kind=kind, node=node, memory_bytes=2**33, matmul_flops={"fp32": 1e12},
                         memory_bandwidth_bytes_per_s=1e11, host_link_bytes_per_s=2e10 if kind == "cuda" else None)


def plan_over(devices: list[DeviceProfile], layout: Layout):
    """The planner's document for this layout on these devices: what `run` executes."""
    problem = build_problem(SPEC, Inventory(devices=devices), Workload("train", batch_size=BATCH, seq_len=SEQ,
                                                                       dtype="fp32"))
    return describe(problem, layout, "exact", 1, 0.0)


def test_each_group_of_a_job_gets_the_rules_transport():
    gpus = {f"cuda:{i}": profile(f"cuda:{i}", "cuda") for i in range(3)}
    cpu = {"cpu": profile("cpu", "cpu")}
    pipeline = RunLayout.of([[("cuda:0", 0, 3), ("cuda:1", 3, 6)]], (4,), (2,))
    on_gpus = job_transports(pipeline, gpus, nccl_usable=True)
    assert on_gpus.pipelines == {(0, 1): "nccl"} and on_gpus.collectives == "nccl" and on_gpus.nccl
    assert not job_transports(pipeline, gpus, nccl_usable=False).nccl  # a CPU build: plain gloo
    assert not job_transports(pipeline, {}, nccl_usable=True).nccl  # no profiles: plain CPU ranks
    two_nodes = {name: p.model_copy(update={"node": name}) for name, p in gpus.items()}
    assert not job_transports(pipeline, two_nodes, nccl_usable=True).nccl
    # a GPU pipeline beside a CPU replica: its messages on NCCL, the step's collectives on gloo
    hybrid = RunLayout.of([[("cuda:0", 0, 3), ("cuda:1", 3, 6)], [("cpu", 0, 6)]], (3, 1), (1, 1))
    mixed = job_transports(hybrid, gpus | cpu, nccl_usable=True)
    assert mixed.pipelines == {(0, 1): "nccl"} and mixed.collectives == "gloo" and mixed.nccl
    assert mixed.to_dict((2,)) == {"pipeline": None, "collectives": "gloo"}
    # a CPU in the pipeline: every hop of it on gloo
    through_cpu = RunLayout.of([[("cuda:0", 0, 2), ("cuda:1", 2, 4), ("cpu", 4, 6)]], (4,), (2,))
    assert not job_transports(through_cpu, gpus | cpu, nccl_usable=True).nccl


def test_a_cpu_build_never_uses_nccl():
    if dist.is_nccl_available() and torch.cuda.is_available():
        pytest.skip("this build and machine can run NCCL")
    assert nccl_usable() is False


def test_a_cpu_run_uses_the_gloo_its_plan_recorded(tmp_path):
    plan = plan_over([profile("cpu0", "cpu"), profile("cpu1", "cpu")], PIPELINE)
    assert [l.transport for l in plan.links] == ["gloo"] and plan.collective_transport == "gloo"
    report = run(plan, steps=1, out_dir=tmp_path, data=DATA, optim=OPTIM, threads=1, timeout_s=240)
    assert [r["transport"] for r in report.ranks] == [{"pipeline": "gloo", "collectives": "gloo"}] * 2


def _equals_a_single_process(plan, tmp_path, transport: dict) -> None:
    """Train the plan in float64 on its GPUs and compare with one CPU process."""
    _, ref_state = reference_run(SPEC, steps=STEPS, global_batch=BATCH, seq_len=SEQ, data=DATA, optim=OPTIM,
                                 dtype=torch.float64)
    report = run(plan, steps=STEPS, out_dir=tmp_path, data=DATA, optim=OPTIM, threads=1, timeout_s=300,
                 param_dtype="fp64", val_data=DATA, eval_every=STEPS, eval_batches=1)
    assert [r["transport"] for r in report.ranks] == [transport] * 2  # the run used what the plan priced
    state = report.state_dict()
    assert set(state) == set(ref_state)
    # float64 on both sides: only summation order differs (cuBLAS against the CPU's), far below the
    # >1e-3 that a lost message or a missed all-reduce moves the weights by
    worst = max(((state[k] - ref_state[k]).norm() / ref_state[k].norm()).item() for k in state)
    assert worst <= 1e-6, worst


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
                                    reason="NCCL between two ranks needs two GPUs (it refuses two ranks on one)")


@pytest.mark.gpu
@needs_two_gpus
def test_two_gpu_stages_exchange_activations_over_nccl_and_equal_a_single_process(tmp_path):
    plan = plan_over([profile("cuda:0", "cuda"), profile("cuda:1", "cuda")], PIPELINE)
    assert [(l.transport, l.through_host) for l in plan.links] == [("nccl", False)]
    _equals_a_single_process(plan, tmp_path, {"pipeline": "nccl", "collectives": "nccl"})


@pytest.mark.gpu
@needs_two_gpus
def test_two_gpu_replicas_all_reduce_over_nccl_and_equal_a_single_process(tmp_path):
    plan = plan_over([profile("cuda:0", "cuda"), profile("cuda:1", "cuda")], DATA_PARALLEL)
    assert plan.collective_transport == "nccl" and not plan.links
    _equals_a_single_process(plan, tmp_path, {"pipeline": None, "collectives": "nccl"})
