"""Issue 11: Alloy's cost model and planner held against published heterogeneous-cluster data.

Each test asserts the issue's threshold. Where the model misses it, the test stays as written and
is marked xfail(strict=True) with the measured value, so a fix shows up as an XPASS failure.
"""

from __future__ import annotations

import pytest

from alloy.devices.schema import MeasuredLayerTimes
from alloy.fidelity import data_root
from alloy.fidelity.helix import parse_quantity
from alloy.plan.timing import interpolate

ROOT = data_root()
needs_data = pytest.mark.skipif(ROOT is None, reason="../shared/data/published-clusters is absent")


def by_name(metrics, prefix):
    found = [m for m in metrics if m.name.startswith(prefix)]
    assert found, prefix
    return found


@pytest.fixture(scope="module")
def per_layer():
    from alloy.fidelity.validate import per_layer_metrics
    return per_layer_metrics(ROOT)


@pytest.fixture(scope="module")
def serving():
    from alloy.fidelity.validate import serving_metrics
    return serving_metrics(ROOT)


@pytest.fixture(scope="module")
def training():
    from alloy.fidelity.validate import training_metrics
    return training_metrics(ROOT)


# ---- no data needed ---------------------------------------------------------------------------

def test_helix_quantities_follow_the_artifact_units():
    assert parse_quantity("1000 * mbps") == 1e9  # Helix divides bytes by mbps: bytes/s
    assert parse_quantity("1 * MilliSec") == 1e-3
    assert parse_quantity("-1") == -1.0


def test_interpolation_is_linear_and_extrapolates_from_the_end_rows():
    assert interpolate([2, 4], [1.0, 2.0], 3) == pytest.approx(1.5)
    assert interpolate([2, 4], [1.0, 2.0], 8) == pytest.approx(4.0)
    assert interpolate([2, 4], [1.0, 2.0], 1) == pytest.approx(0.5)


def test_measured_layer_times_reject_mismatched_rows():
    with pytest.raises(ValueError):
        MeasuredLayerTimes(hidden_size=8, num_layers=2, phase="decode", batch=[1, 2], layer_s=[0.1])


def test_measured_profile_replaces_the_flop_estimate():
    from alloy.devices import DeviceProfile, Inventory
    from alloy.plan import Workload
    from alloy.plan.timing import build_problem, stage_compute_s
    from alloy.spec import resolve_spec

    spec = resolve_spec("llama-3.2-1b")
    times = MeasuredLayerTimes(hidden_size=spec.hidden_size, num_layers=spec.num_layers, phase="train",
                               batch=[1, 2], layer_s=[0.5, 1.0])
    dev = DeviceProfile(name="g", kind="cuda", memory_bytes=80 * 2**30, matmul_flops={"bf16": 1e14},
                        memory_bandwidth_bytes_per_s=1e12, layer_times=[times])
    p = build_problem(spec, Inventory(devices=[dev]), Workload(task="train", batch_size=4, seq_len=128))
    assert float(stage_compute_s(p, 0, 2, 5, 2)) == pytest.approx(3 * 1.0)


# ---- 1. per-layer time ------------------------------------------------------------------------

@needs_data
@pytest.mark.parametrize("model", ["llama70b", "llama30b"])
def test_per_layer_time_within_35_percent(per_layer, model):
    m = by_name(per_layer, f"per-layer time {model}")[0]
    assert abs(m.error) <= 0.35, m


@needs_data
def test_device_ratios_within_20_percent_llama30b(per_layer):
    m = by_name(per_layer, "device ratio llama30b")[0]
    assert abs(m.error) <= 0.20, m


@needs_data
@pytest.mark.xfail(strict=True, reason="measured: worst ratio error +24% (T4x4 : A100, decode; T4x4 decode "
                   "slows from batch 18 on, a vLLM kernel switch the roofline does not have)")
def test_device_ratios_within_20_percent_llama70b(per_layer):
    m = by_name(per_layer, "device ratio llama70b")[0]
    assert abs(m.error) <= 0.20, m


# ---- 2. serving throughput --------------------------------------------------------------------

@needs_data
@pytest.mark.xfail(strict=True, reason="measured: predictions 3.4x-12x the prototype (e.g. 70B Helix 1231 vs "
                   "223.4 tok/s); the capacity model ignores vLLM step overheads, prefill/decode "
                   "interference and the coordinator's in-flight limit")
def test_offline_throughput_within_25_percent(serving):
    for m in by_name(serving, "offline decode tok/s"):
        assert abs(m.error) <= 0.25, m


@needs_data
@pytest.mark.xfail(strict=True, reason="measured: predicted petals 1664 > helix 1231 tok/s (70B)")
def test_70b_ranking_is_kept(serving):
    assert by_name(serving, "ranking 70B")[0].passed


@needs_data
def test_t4_pipeline_is_the_bottleneck_of_separate_70b(serving):
    assert by_name(serving, "70B separate")[0].passed


# ---- 3. training step time --------------------------------------------------------------------

@needs_data
def test_sailor_mit_step_time(training):
    assert by_name(training, "Sailor mit: median")[0].error <= 0.20
    assert by_name(training, "Sailor mit: worst")[0].error <= 0.35
    assert by_name(training, "Sailor mit: Spearman")[0].error >= 0.8


@needs_data
def test_sailor_mit_leaves_out_the_suspect_plans():
    from alloy.fidelity.training import sailor_plans
    names = [p.name for p in sailor_plans(ROOT, "mit")]
    assert len(names) == 8 and "mit/N6/plan_config_N6_D2.json" not in names


@needs_data
def test_sailor_clariden_median_within_10_percent(training):
    assert by_name(training, "Sailor clariden: median")[0].error <= 0.10


@needs_data
@pytest.mark.xfail(strict=True, reason="measured: Spearman 0.39 on 43 trials (AMP's own model 0.39)")
def test_amp_rank_correlation(training):
    assert by_name(training, "AMP het_cluster: Spearman")[0].error >= 0.6


@needs_data
def test_amp_top_ranked_plan_is_near_the_best(training):
    assert by_name(training, "AMP het_cluster: measured time")[0].error <= 0.10


# ---- 4. planner vs. the papers' planners ------------------------------------------------------

@needs_data
def test_alloy_plan_beats_helix_milp_under_the_same_model_and_plans_fast():
    from alloy.fidelity.validate import planner_metrics
    vs_milp, seconds = planner_metrics(ROOT)
    assert vs_milp.predicted >= vs_milp.published, vs_milp
    assert seconds.predicted < 10, seconds
