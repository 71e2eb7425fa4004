"""Verify before committing: candidates run for real, the measured-fastest wins, every trial is
recorded, and a device that only slows the job is left out with the reason — even when its profile
claims it is fast."""

from __future__ import annotations

import subprocess
import sys

import pytest

from alloy.devices import CpuSlice, DeviceProfile, Inventory, quota_unavailable_reason
from alloy.devices.schema import MeasuredLayerTimes
from alloy.plan import Workload
from alloy.runtime.run import RunReport
from alloy.spec import ModelSpec

SPEC = ModelSpec(family="llama", vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, intermediate_size=64, max_seq_len=64, tie_embeddings=True)
WORK = Workload("train", batch_size=8, seq_len=32, dtype="fp32")


def claimed_fast(name: str, quota: float) -> DeviceProfile:
    """A worker whose profile says 'as fast as a full core', whatever its real quota."""
    times = MeasuredLayerTimes(hidden_size=32, num_layers=2, phase="train", batch=[1.0, 8.0],
                               layer_s=[2e-4, 1e-3], first_s=[5e-5, 2e-4], last_s=[2e-4, 1e-3])
    return DeviceProfile(name=name, kind="cpu", memory_bytes=2**32, matmul_flops={"fp32": 5e10},
                         memory_bandwidth_bytes_per_s=1e10, measured=True, cpu_slice=CpuSlice(quota=quota),
                         layer_times=[times], threads=1)


@pytest.mark.skipif(quota_unavailable_reason() is not None, reason=f"needs CPU quotas: {quota_unavailable_reason()}")
def test_verification_leaves_out_a_worker_that_only_slows_the_job():
    from alloy.runtime.verify import NOISE, verify

    # Quotas 100 % and 10 %, both profiled as full cores: the planner predicts that sharing the
    # batch halves the step. Only running it shows the 10 % worker makes every step wait for it.
    inventory = Inventory(name="q100-10", devices=[claimed_fast("q1", 1.0), claimed_fast("q0.1", 0.1)])
    lines = []
    plan = verify(SPEC, inventory, WORK, top=2, log=lines.append, timeout_s=240)
    v = plan.verification
    names = " ; ".join(t.name for t in v.trials)
    assert v.trials[0].name.startswith("alloy #1")
    assert "equal shares" in names and "fastest alone" in names and "proportional shares" in names, names
    planned = v.trials[0]
    assert "q0.1" in planned.devices, "the misleading profile should have made the planner use the slow worker"
    assert all(t.measured_step_s and t.predicted_step_s > 0 for t in v.trials), [(t.name, t.error) for t in v.trials]
    chosen = next(t for t in v.trials if t.name == v.chosen)
    assert chosen.measured_step_s <= min(t.measured_step_s for t in v.trials) * (1 + NOISE)
    assert [d.name for d in plan.devices] == ["q1"] and plan.unused_devices == ["q0.1"]
    assert "q0.1 left out" in v.note and "slower" in v.note
    assert any("measured" in line for line in lines)  # the user saw each trial's figure as it ran


def test_a_step_far_off_its_prediction_names_the_term_that_was_off():
    records = [{"step_s": 1.0, "sync_s": 0.1, "optimizer_s": 0.6, "started_s": float(i)} for i in range(4)]
    ranks = [{"records": records}]
    report = RunReport(out_dir=None, losses=[], ranks=ranks, predicted_step_s=0.5, measured_step_s=1.0,
                       tokens_per_s=1.0, predicted_terms={"compute_s": 0.3, "allreduce_s": 0.1, "optimizer_s": 0.1})
    warning = report.off_term()
    assert "50% off" in warning and "the optimizer update" in warning and "0.6 s measured" in warning
    close = RunReport(out_dir=None, losses=[], ranks=ranks, predicted_step_s=0.9, measured_step_s=1.0,
                      tokens_per_s=1.0, predicted_terms={"compute_s": 0.3, "allreduce_s": 0.1, "optimizer_s": 0.5})
    assert close.off_term() is None  # 10 % off: the prediction held


def test_plan_verify_refuses_devices_that_are_not_here(tmp_path):
    cluster = tmp_path / "cluster.json"
    Inventory(devices=[DeviceProfile(name="a100", kind="cuda", memory_bytes=2**35, matmul_flops={"bf16": 3e14},
                                     memory_bandwidth_bytes_per_s=2e12)]).save(cluster)
    proc = subprocess.run([sys.executable, "-m", "alloy", "plan", "--model", "tiny-llama", "--devices", str(cluster),
                           "--verify"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "declared, not measured on this machine" in proc.stderr and "a100" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "alloy", "plan", "--model", "tiny-llama", "--devices", str(cluster),
                           "--verify", "--task", "infer"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "for --task train" in proc.stderr


@pytest.mark.parametrize("layer_times", [True, False], ids=["layer-times", "matmul-rate"])
def test_a_run_feeds_back_so_the_next_plan_predicts_what_was_measured(tmp_path, monkeypatch, layer_times):
    """learn(): a one-stage replica that computed twice as long as predicted doubles that device's
    compute in the cached calibration — its measured layer times, or where it has none its matmul
    rate — and the next plan on the same devices predicts that."""
    import json

    from alloy.plan import make_plan
    from alloy.runtime import calibrate

    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path))
    device = claimed_fast("q1", 1.0)
    if not layer_times:
        device = device.model_copy(update={"layer_times": []})
    inventory = Inventory(name="one", devices=[device])
    names = ["q1"]
    measured = {"names": names, "startup_s": 3.0, "when": "now", "links": [],
                "allreduce": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e9},
                "devices": {"q1": {"optimizer_s_per_param": 1e-9, "micro_batch_overhead_s": 1e-4}}}
    path = calibrate.cache_path(inventory, names, SPEC)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(measured))
    before = calibrate.calibrate(inventory, spec=SPEC)  # from the cache: nothing is measured here
    plan = make_plan(SPEC, before, WORK)
    stage = plan.replicas[0].stages[0]
    records = [{"step_s": 2 * stage.predicted_busy_s + 0.01, "sync_s": 0.01, "optimizer_s": 0.0}] * 4
    report = RunReport(out_dir=None, losses=[], ranks=[{"rank": 0, "records": records}], predicted_step_s=None,
                       measured_step_s=1.0, tokens_per_s=1.0)
    assert calibrate.learn(before, [(plan, report)]) == pytest.approx({"q1": 2.0})
    after = calibrate.calibrate(inventory, spec=SPEC)
    again = make_plan(SPEC, after, WORK)
    assert again.replicas[0].stages[0].predicted_busy_s == pytest.approx(2 * stage.predicted_busy_s, rel=1e-9)
    assert "rescaled by runs: q1 x2.00" in after.calibrated


def test_each_device_set_is_priced_with_what_it_showed_when_it_ran_together(tmp_path, monkeypatch):
    """A slice alone ran faster than predicted, the same slice beside another slower (they share a
    machine): learn() keeps a scale per set of devices that ran together, and verify prices a layout
    on a set that has run with that set's scale — each within what was measured — where one scale
    per device would be off for both."""
    import json

    from alloy.plan import make_plan
    from alloy.runtime import calibrate
    from alloy.runtime.verify import _priced_on_its_set

    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path))
    inventory = Inventory(name="two", devices=[claimed_fast("q1", 1.0), claimed_fast("q2", 1.0)])
    names = ["q1", "q2"]
    measured = {"names": names, "startup_s": 3.0, "when": "now", "links": [],
                "allreduce": {"latency_s": 1e-4, "bandwidth_bytes_per_s": 1e9},
                "devices": {n: {"optimizer_s_per_param": 1e-9, "micro_batch_overhead_s": 1e-4} for n in names}}
    path = calibrate.cache_path(inventory, names, SPEC)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(measured))
    before = calibrate.calibrate(inventory, spec=SPEC)
    alone = make_plan(SPEC, before, WORK, device_names=["q1"], replicas=1)
    both = make_plan(SPEC, before, WORK, replicas=2)
    assert {s.device for r in both.replicas for s in r.stages} == {"q1", "q2"}

    def report(plan, ratio):
        ranks = [{"rank": s.rank, "records": [{"step_s": ratio * s.predicted_busy_s + 0.01, "sync_s": 0.01,
                                               "optimizer_s": 0.0}] * 4} for r in plan.replicas for s in r.stages]
        return RunReport(out_dir=None, losses=[], ranks=ranks, predicted_step_s=None, measured_step_s=1.0,
                         tokens_per_s=1.0)

    general = calibrate.learn(before, [(alone, report(alone, 0.6)), (both, report(both, 1.5))])
    assert general["q1"] == pytest.approx((0.6 + 1.5) / 2)  # the median of the two runs' q1 scales
    after = calibrate.calibrate(inventory, spec=SPEC)
    for plan, ratio in ((alone, 0.6), (both, 1.5)):
        again = _priced_on_its_set(plan, SPEC, after, WORK, None)  # the same layout, priced after the runs
        for r_old, r_new in zip(plan.replicas, again.replicas):
            assert r_new.stages[0].predicted_busy_s == pytest.approx(ratio * r_old.stages[0].predicted_busy_s,
                                                                     rel=1e-9)
    assert calibrate.set_factors(after, ["q2", "q1"]) == pytest.approx({"q1": 1.5 / 1.05, "q2": 1.0})
    assert calibrate.set_factors(after, ["q2"]) == {}  # a set that has not run: the general scale alone


def test_a_close_call_is_run_again_and_decided_on_the_mean(monkeypatch):
    """The two fastest trials within RUNOFF of each other run once more; each keeps its mean, so a
    layout that was lucky in one short run does not win on that luck alone."""
    from alloy.plan.plan import Trial
    from alloy.runtime import verify as verify_module

    again = {"lucky": 1.4, "steady": 1.05}  # what the second runs measure
    monkeypatch.setattr(verify_module, "_trial", lambda name, plan, *a: (
        Trial(name=name, layout="", devices=[], predicted_step_s=1.0, measured_step_s=again[name]), None))
    first = [(Trial(name="lucky", layout="", devices=[], predicted_step_s=1.0, measured_step_s=1.0), "p1"),
             (Trial(name="steady", layout="", devices=[], predicted_step_s=1.0, measured_step_s=1.1), "p2"),
             (Trial(name="slow", layout="", devices=[], predicted_step_s=1.0, measured_step_s=2.0), "p3")]
    ran = verify_module._runoff(first, 6, 60.0, {}, lambda line: None)
    measured = {t.name: t.measured_step_s for t, _ in ran}
    assert measured == pytest.approx({"lucky": 1.2, "steady": 1.075, "slow": 2.0})
    far = [first[0], first[2]]  # 2x apart: no second run
    assert verify_module._runoff(far, 6, 60.0, {}, lambda line: None) == far


@pytest.mark.parametrize("first_error, runs, measured", [
    ("could not reach the rendezvous at 127.0.0.1:1 in time", 2, True),  # may pass on another try
    ("worker rank 1 failed: RuntimeError: Connection reset by peer", 2, True),
    ("alloy worker rank 0: error: the plan needs 3 ranks", 1, False),  # the worker's own error: settled
    ("worker rank 1 died of exit code -9 (SIGKILL, which on Linux is most often the out-of-memory killer)", 1, False),
    ("the job did not finish within 240 s (rendezvous 127.0.0.1:1)", 1, False),  # another try costs as long
])
def test_a_trial_whose_launch_broke_runs_once_more(monkeypatch, first_error, runs, measured):
    from types import SimpleNamespace

    from alloy.plan import make_plan
    from alloy.runtime import verify as verify_module
    from alloy.runtime.launch import LaunchError

    calls = []

    def flaky_run(plan, **options):
        calls.append(options)
        if len(calls) == 1:
            raise LaunchError(first_error)
        return SimpleNamespace(measured_step_s=0.25)

    monkeypatch.setattr(verify_module, "run", flaky_run)
    plan = make_plan(SPEC, Inventory(devices=[claimed_fast("q1", 1.0)]), WORK)
    lines = []
    trial, report = verify_module._trial("alloy #1", plan, 6, 60.0, {}, lines.append)
    assert len(calls) == runs
    assert (trial.measured_step_s == 0.25 and not trial.error and report is not None) if measured else \
        (trial.measured_step_s is None and trial.error == first_error and report is None)
    assert any("once more" in line for line in lines) == measured
