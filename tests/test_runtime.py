"""The runtime against a single process: real torchrun workers over gloo, on CPU.

The equality tests train in float64 (the job's param_dtype, the reference's dtype), so their bound
comes from float64 rounding, not from one CPU's fp32 summation order; one fp32 run checks that
the ordinary path trains."""

from __future__ import annotations

import dataclasses

import concurrent.futures
import json
import os
import time
from pathlib import Path

import pytest
import torch

from alloy.runtime import (DataSource, LaunchError, OptimConfig, PlanMismatchError, Rendezvous, RunLayout,
                           job_document, reference_run, run_job)
from alloy.runtime.launch import free_port
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=48, max_seq_len=64, tie_embeddings=True)
STEPS, SEQ = 3, 8
DATA = DataSource("random", seed=3)
OPTIM = OptimConfig(lr=3e-3, weight_decay=0.1)
FP64 = torch.float64
# float64 rounds at ~1.1e-16 per op; summation order, layers and a few AdamW steps amplify that by
# orders of magnitude at most, while a real bug (a wrong loss weighting, a missed all-reduce) moves
# the weights by >1e-3: 1e-10 holds on any CPU and still tells the two apart by seven orders.
TOL = 1e-10



LAYOUTS = {
    # uneven data parallel: three replicas with 3, 2 and 1 samples of a 6-sample batch
    "dp-3-2-1": RunLayout.of([[(f"cpu{i}", 0, 6)] for i in range(3)], (3, 2, 1), (1, 1, 1)),
    # uneven pipeline: 3, 2 and 1 layers, embeddings first, (tied) head last
    "pp-3-2-1": RunLayout.of([[("cpu0", 0, 3), ("cpu1", 3, 5), ("cpu2", 5, 6)]], (6,), (3,)),
    # 2 replicas x 2 stages, split differently, with uneven shares
    "hybrid-2x2": RunLayout.of([[("cpu0", 0, 4), ("cpu1", 4, 6)], [("cpu2", 0, 2), ("cpu3", 2, 6)]], (4, 2), (2, 2)),
}


def _relative(got: dict, expected: dict) -> float:
    """Largest ||got - expected|| / ||expected|| over the parameters both hold."""
    assert got, "no parameters came back"
    return max(((got[k] - expected[k]).norm() / expected[k].norm()).item() for k in got)


@pytest.mark.parametrize("name", LAYOUTS)
def test_distributed_training_equals_a_single_process(name, tmp_path):
    layout = LAYOUTS[name]
    ref_losses, ref_state = reference_run(SPEC, steps=STEPS, global_batch=layout.global_batch, seq_len=SEQ,
                                          data=DATA, optim=OPTIM, dtype=FP64)
    job = job_document(SPEC, layout, steps=STEPS, seq_len=SEQ, out_dir=tmp_path, data=DATA, optim=OPTIM,
                       threads=1, timeout_s=60, param_dtype="fp64")
    report = run_job(job, timeout_s=240)
    state = report.state_dict()
    assert set(state) == set(ref_state)  # the stages of replica 0 hold the whole model once
    assert all(v.dtype == FP64 for v in state.values())
    assert _relative(state, ref_state) <= TOL
    for r in report.ranks:  # every replica ends identical, not only replica 0
        from safetensors.torch import load_file
        assert _relative(load_file(tmp_path / f"rank{r['rank']}.safetensors"), ref_state) <= TOL
    assert report.losses == pytest.approx(ref_losses, rel=TOL, abs=0)
    from alloy.model import Transformer
    from alloy.model.init import init_params
    init = init_params(Transformer(SPEC), 0).state_dict()
    assert _relative(state, init) > 1e-2  # the steps really moved the weights


def test_overlapped_buckets_with_accumulation_equal_a_single_process(tmp_path):
    """Data parallel sends gradient buckets while the backward runs (only on the last accumulated
    batch): a model big enough for several buckets, two accumulated batches, uneven shares."""
    from alloy.plan.timing import gradient_bucket_bytes
    spec = dataclasses.replace(SPEC, vocab_size=4096, hidden_size=64, head_dim=16, num_layers=2)
    grad_bytes = spec.num_params() * 8
    assert grad_bytes / gradient_bucket_bytes(grad_bytes, overlap=True) >= 2  # several buckets
    layout = RunLayout.of([[(f"cpu{i}", 0, 2)] for i in range(2)], (3, 1), (1, 1))
    ref_losses, ref_state = reference_run(spec, steps=2, global_batch=4, seq_len=SEQ, data=DATA, optim=OPTIM,
                                          grad_accum=2, dtype=FP64)
    job = job_document(spec, layout, steps=2, seq_len=SEQ, out_dir=tmp_path, data=DATA, optim=OPTIM, threads=1,
                       timeout_s=60, param_dtype="fp64", grad_accum=2)
    report = run_job(job, timeout_s=240)
    assert _relative(report.state_dict(), ref_state) <= TOL
    assert report.losses == pytest.approx(ref_losses, rel=TOL, abs=0)


def test_an_fp32_run_trains(tmp_path):
    """The ordinary fp32 path (the equality tests run fp64): pipeline and replicas, training and
    evaluation, on a learnable token cycle, so its loss is finite and falls every step."""
    import json

    import numpy as np
    tokens = tmp_path / "tokens.bin"
    (np.arange(4096, dtype=np.int32) * 5 % 17).tofile(tokens)  # each token determines the next
    data = DataSource("tokens", seed=1, path=str(tokens))
    metrics = tmp_path / "metrics.jsonl"
    job = job_document(SPEC, LAYOUTS["hybrid-2x2"], steps=4, seq_len=SEQ, out_dir=tmp_path, data=data,
                       optim=OptimConfig(lr=1e-2), threads=1, timeout_s=60, val_data=data, eval_every=4,
                       eval_batches=1, metrics_path=str(metrics))
    report = run_job(job, timeout_s=240)
    assert all(v.dtype == torch.float32 for v in report.state_dict().values())
    losses = report.losses
    assert all(np.isfinite(losses)) and all(b < a for a, b in zip(losses, losses[1:])), losses
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert np.isfinite(last["eval_loss"]) and last["eval_loss"] < losses[0]


def test_plain_mean_of_uneven_shares_would_be_wrong():
    """Why the loss weighting matters: averaging per-replica means of 3/2/1 samples is not the
    batch mean, so an equivalence test with uneven shares can tell the two apart."""
    batch = DATA.batch(0, 6, SEQ, SPEC.vocab_size)
    from alloy.model import Transformer
    from alloy.model.init import init_params
    from alloy.runtime.engine import token_loss_sum
    model = init_params(Transformer(SPEC), 0)
    with torch.no_grad():
        per_sample = torch.stack([token_loss_sum(model(b[None, :-1]), b[None, 1:]) for b in batch]) / SEQ
    exact = per_sample.mean()
    naive = torch.stack([per_sample[:3].mean(), per_sample[3:5].mean(), per_sample[5:].mean()]).mean()
    assert not torch.isclose(exact, naive, rtol=1e-6)


def test_two_node_rendezvous_on_one_machine_equals_a_single_process(tmp_path):
    layout = RunLayout.of([[("cpu0", 0, 4), ("cpu1", 4, 6)]], (4,), (2,))
    _, ref_state = reference_run(SPEC, steps=STEPS, global_batch=4, seq_len=SEQ, data=DATA, optim=OPTIM, dtype=FP64)
    job = job_document(SPEC, layout, steps=STEPS, seq_len=SEQ, out_dir=tmp_path, data=DATA, optim=OPTIM,
                       threads=1, timeout_s=60, param_dtype="fp64")
    endpoint = f"127.0.0.1:{free_port()}"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        nodes = [pool.submit(run_job, job, rdzv=Rendezvous(nnodes=2, node_rank=k, endpoint=endpoint), timeout_s=240)
                 for k in (0, 1)]
        reports = [f.result() for f in nodes]
    assert _relative(reports[0].state_dict(), ref_state) <= TOL


def test_several_nodes_number_their_ranks_in_node_rank_order(tmp_path):
    """Rank r runs stage r, planned for a device of node r // per_node: so node K's workers must get
    ranks K * per_node ... (c10d's rendezvous ignores --node-rank and orders nodes by host and pid)."""
    from alloy.runtime.launch import launch

    endpoint = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    # node 1 starts first: an order by start time or pid would give it ranks 0-1
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        nodes = []
        for k in (1, 0):
            nodes.append(pool.submit(launch, {"out_dir": str(tmp_path)}, 2, env=env, worker_module="rank_probe",
                                     rdzv=Rendezvous(nnodes=2, node_rank=k, endpoint=endpoint), timeout_s=120))
            time.sleep(1.0)
        for f in nodes:
            f.result()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]
    assert [(r["node"], r["group_rank"]) for r in ranks] == [(0, 0), (0, 0), (1, 1), (1, 1)]


def test_a_rendezvous_port_taken_before_torchrun_binds_it_is_replaced(tmp_path, monkeypatch):
    """free_port() closes its socket before torchrun binds the port, so another process can take it
    in between: the launch picks another port at once instead of joining the stranger as a client
    and waiting out the job's timeout."""
    import importlib
    import socket

    launch_module = importlib.import_module("alloy.runtime.launch")  # the package's `launch` is the function

    with socket.socket() as stranger:
        stranger.bind(("127.0.0.1", 0))
        stranger.listen()
        picks = [stranger.getsockname()[1]]
        monkeypatch.setattr(launch_module, "free_port", lambda: picks.pop() if picks else free_port())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
        start = time.monotonic()
        launch_module.launch({"out_dir": str(tmp_path)}, 2, env=env, worker_module="rank_probe", timeout_s=120)
    assert not picks  # the taken port was offered first
    assert sorted(json.loads((tmp_path / f"rank{r}.json").read_text())["rank"] for r in range(2)) == [0, 1]
    assert time.monotonic() - start < 60


def test_unreachable_rendezvous_fails_in_bounded_time_naming_the_address(tmp_path):
    layout = RunLayout.of([[("cpu0", 0, 6)], [("cpu1", 0, 6)]], (1, 1), (1, 1))
    job = job_document(SPEC, layout, steps=1, seq_len=SEQ, out_dir=tmp_path, threads=1, timeout_s=20)
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(LaunchError, match=endpoint.replace(".", r"\.")):
        run_job(job, rdzv=Rendezvous(nnodes=2, node_rank=1, endpoint=endpoint, join_timeout_s=5), timeout_s=120)
    assert time.monotonic() - start < 90


@pytest.mark.parametrize("stages,match", [
    (((0, 3), (4, 6)), "gap"),
    (((0, 4), (3, 6)), "overlap"),
    (((0, 3), (3, 5)), "covers layers \\[0, 5\\) but the model has 6"),
])
def test_plan_that_does_not_tile_the_model_is_refused(stages, match, tmp_path):
    layout = RunLayout.of([[(f"cpu{i}", a, b) for i, (a, b) in enumerate(stages)]], (2,), (1,))
    with pytest.raises(PlanMismatchError, match=match):
        job_document(SPEC, layout, steps=1, seq_len=SEQ, out_dir=tmp_path)


def test_a_stage_numbered_against_its_place_is_refused(tmp_path):
    """The workers take their rank from a stage's place in the layout; its own numbering must agree."""
    layout = LAYOUTS["hybrid-2x2"]
    first, second = layout.replicas[0]
    renumbered = RunLayout(((first.model_copy(update={"rank": 2}), second), layout.replicas[1]),
                           layout.batch_shares, layout.micro_batches)
    with pytest.raises(PlanMismatchError, match="numbered rank 2, replica 0, position 0; ranks go replica-major"):
        job_document(SPEC, renumbered, steps=1, seq_len=SEQ, out_dir=tmp_path)


def test_plan_for_other_devices_is_refused(tmp_path):
    layout = LAYOUTS["dp-3-2-1"]
    with pytest.raises(PlanMismatchError, match="does not describe: cpu2"):
        job_document(SPEC, layout, steps=1, seq_len=SEQ, out_dir=tmp_path, devices={"cpu0": {}, "cpu1": {}})


def test_world_size_that_does_not_match_the_plan_fails_cleanly(tmp_path):
    from alloy.runtime.launch import launch
    layout = LAYOUTS["dp-3-2-1"]
    job = job_document(SPEC, layout, steps=1, seq_len=SEQ, out_dir=tmp_path, threads=1, timeout_s=20)
    with pytest.raises(LaunchError, match="the job has 2 ranks but the plan needs 3"):
        launch(job, 2, timeout_s=120)


def test_a_stalled_rank_fails_the_job_within_the_collective_timeout(tmp_path):
    """gloo collectives can hang (PyTorch #132644); every one carries the job's timeout."""
    from alloy.runtime.launch import launch

    layout = LAYOUTS["pp-3-2-1"]
    job = job_document(SPEC, layout, steps=2, seq_len=SEQ, out_dir=tmp_path, threads=1, timeout_s=8)
    env = dict(os.environ, STALL_RANK="2",  # rank 2 never arrives (tests/stall_worker.py)
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    start = time.monotonic()
    with pytest.raises(LaunchError, match="rank [01]"):
        launch(job, layout.world_size, env=env, worker_module="stall_worker", timeout_s=180)
    assert time.monotonic() - start < 120


def test_a_plan_from_the_planner_runs_and_equals_a_single_process(tmp_path):
    """The runtime consumes exactly the planner's document: plan 3 unequal CPUs, run, compare."""
    from alloy.devices import DeviceProfile, Inventory
    from alloy.plan import Workload, make_plan
    from alloy.runtime import run

    inventory = Inventory(name="three-cpus", devices=[
        DeviceProfile(name=f"cpu{i}", kind="cpu", memory_bytes=2**30, matmul_flops={"fp32": rate},
                      memory_bandwidth_bytes_per_s=1e10) for i, rate in enumerate((4e10, 2e10, 1e10))])
    plan = make_plan(SPEC, inventory, Workload("train", batch_size=7, seq_len=SEQ, dtype="fp32"))
    assert plan.world_size >= 2
    _, ref_state = reference_run(SPEC, steps=STEPS, global_batch=7, seq_len=SEQ, data=DATA, optim=OPTIM, dtype=FP64)
    report = run(plan, steps=STEPS, out_dir=tmp_path, data=DATA, optim=OPTIM, threads=1, timeout_s=240,
                 param_dtype="fp64")
    assert _relative(report.state_dict(), ref_state) <= TOL
    assert report.predicted_step_s == plan.predicted.step_s and report.prediction_error is not None
    assert (tmp_path / "report.json").is_file()


def test_a_plan_for_another_model_is_refused(tmp_path):
    from alloy.devices import DeviceProfile, Inventory
    from alloy.plan import Workload, make_plan
    from alloy.runtime import run

    inventory = Inventory(devices=[DeviceProfile(name="cpu", kind="cpu", memory_bytes=2**30,
                                                 matmul_flops={"fp32": 1e10}, memory_bandwidth_bytes_per_s=1e10)])
    plan = make_plan(SPEC, inventory, Workload("train", batch_size=2, seq_len=SEQ, dtype="fp32"))
    with pytest.raises(PlanMismatchError, match="num_layers: 6 in the plan, 4 given"):
        run(plan, steps=1, out_dir=tmp_path, spec=SPEC.replace(num_layers=4))


@pytest.mark.gpu
def test_a_cpu_stage_next_to_a_gpu_stage_equals_a_single_process(tmp_path):
    """Pipeline messages stay on the host (gloo) while the GPU stage computes on CUDA."""
    layout = RunLayout.of([[("cpu", 0, 3), ("cuda:0", 3, 6)]], (4,), (2,))
    devices = {"cpu": {"name": "cpu", "kind": "cpu", "memory_bytes": 2**30, "matmul_flops": {"fp32": 1e10},
                       "memory_bandwidth_bytes_per_s": 1e10},
               "cuda:0": {"name": "cuda:0", "kind": "cuda", "memory_bytes": 2**30, "matmul_flops": {"fp32": 1e12},
                          "memory_bandwidth_bytes_per_s": 1e11}}
    _, ref_state = reference_run(SPEC, steps=STEPS, global_batch=4, seq_len=SEQ, data=DATA, optim=OPTIM)
    job = job_document(SPEC, layout, steps=STEPS, seq_len=SEQ, out_dir=tmp_path, data=DATA, optim=OPTIM,
                       devices=devices, threads=1, timeout_s=120)
    report = run_job(job, timeout_s=300)
    assert _relative(report.state_dict(), ref_state) <= 1e-4  # TF32/cuBLAS may differ slightly from CPU


def test_launch_error_names_the_rank_that_failed_first():
    """torchrun's log of a GPU run that failed (the stage input stride check of torch 2.11): rank 1 only
    saw its peer go away, so rank 0's error, module-qualified, is the one reported."""
    from alloy.runtime.launch import _first_error
    log = "\n".join([
        "[rank1]: Traceback (most recent call last):",
        "[rank1]: RuntimeError: [/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by "
        "peer [127.0.0.1]:4500",
        "[rank0]: Traceback (most recent call last):",
        "[rank0]: torch.distributed.pipelining._utils.PipeliningShapeError: Stage 0 forward inputs: value 0 has a "
        "stride mismatch: expected (8, 1) actual (9, 1)",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"])
    assert _first_error(log, "127.0.0.1:1") == ("worker rank 0 failed: torch.distributed.pipelining._utils."
                                                "PipeliningShapeError: Stage 0 forward inputs: value 0 has a stride "
                                                "mismatch: expected (8, 1) actual (9, 1)")
    only_peer = "\n".join(log.splitlines()[:2])
    assert _first_error(only_peer, "127.0.0.1:1").startswith("worker rank 1 failed: RuntimeError:")


def test_a_worker_killed_by_a_signal_is_reported_with_its_rank_and_cause():
    from alloy.runtime.launch import _first_error

    log = "\n".join([
        "terminate called without an active exception", "=" * 54, "alloy.runtime.worker FAILED", "-" * 54,
        "Root Cause (first observed failure):", "[0]:", "  rank      : 1 (local_rank: 1)",
        "  exitcode  : -6 (pid: 4242)", "  traceback : Signal 6 (SIGABRT) received by PID 4242", "=" * 54])
    assert _first_error(log, "127.0.0.1:1") == ("worker rank 1 died of exit code -6 (SIGABRT): "
                                                "terminate called without an active exception")
    assert "=" not in _first_error("=" * 40 + "\nsomething broke\n" + "-" * 40, "x")


def test_a_child_process_error_is_its_cause_not_a_librarys_footer():
    from alloy.devices.slice_worker import child_error

    stderr = "\n".join([
        "Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for MeasuredLayerTimes",
        "  Value error, batch sizes must be strictly increasing",
        "    For further information visit https://errors.pydantic.dev/2.11/v/value_error"])
    assert child_error(stderr).startswith("pydantic_core._pydantic_core.ValidationError: 1 validation error")
    assert child_error(stderr + "\nslice_worker error: ValidationError: batch sizes must be strictly increasing") == (
        "ValidationError: batch sizes must be strictly increasing")
