"""The prepared GPU benchmark (bench/gpu.sh, bench/gpu/): each entry point smoke-tested on the CPU
with a tiny model (it runs and reports sane numbers; no speed is asserted), the script's syntax
and its no-CUDA exit, and, on a CUDA machine only, the real run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu import common, summary

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.sh"
TINY_LAYERS = common.SIZES["tiny"]["layers"]


def run_entry(name: str, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", f"bench.gpu.{name}", *args], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """One BENCH_GPU_SMOKE=1 run of gpu.sh: each entry point as its own process with --device cpu
    --tiny, under the script's timeouts, then the summary. The tests below read its results
    (one shared run: importing transformers three times is most of the time on a small machine)."""
    out = tmp_path_factory.mktemp("gpu-smoke") / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "BENCH_GPU_SMOKE": "1", "ALLOY_COMMIT": "abc123"}
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return out


def tiny(smoke: Path, name: str) -> dict:
    doc = json.loads((smoke / f"{name}.json").read_text())
    assert doc["complete"] and not doc["errors"], doc["errors"]
    assert doc["device"] == "cpu" and doc["tiny"]
    return doc


def test_train_tiny_runs_both_sides_and_reports_mfu(smoke):
    doc = tiny(smoke, "train")
    impls = [s["impl"] for s in doc["samples"]]
    assert impls == ["alloy", "transformers"]  # alternated, one fresh model each
    for s in doc["samples"]:
        assert s["tokens_per_s"] > 0 and 0 < s["mfu_vs_measured"] < 5 and s["mfu_vs_peak"] > 0
        assert s["final_loss"] == pytest.approx(6.24, abs=0.5)  # ~ln(512): an untrained model, sane
    assert doc["measured_matmul_flops_per_s"] > 0
    assert doc["summary"]["ratio_tokens_per_s"]["n"] == 1


def test_decode_tiny_runs_both_batches_and_reports_roofline(smoke):
    doc = tiny(smoke, "decode")
    assert {(s["impl"], s["batch"]) for s in doc["samples"]} == {(i, b) for i in ("alloy", "transformers")
                                                                 for b in (1, 8)}
    for s in doc["samples"]:
        assert s["tokens_per_s"] > 0 and 0 < s["roofline_fraction_measured"] < 2
    assert doc["weight_bytes_per_token"]["alloy"] == doc["weight_bytes_per_token"]["transformers"]
    assert doc["summary"]["ratio_tokens_per_s_b8"]["n"] == 1


def test_decode_with_alloy_in_a_block_format_against_transformers(tmp_path):
    # gpu.sh's decode_q4_0 step (GPU only there), on the tiny model on CPU: Alloy's side in Q4_0
    # blocks, transformers' in --dtype; the summary quotes its ratios beside decode's
    out = tmp_path / "decode_q4_0.json"
    proc = run_entry("decode", "--device", "cpu", "--tiny", "--dtype", "fp32", "--alloy-dtype", "q4_0",
                     "--out", str(out), timeout_s=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] and not doc["errors"] and doc["alloy_dtype"] == "q4_0" and doc["dtype"] == "fp32"
    assert {(s["impl"], s["batch"]) for s in doc["samples"]} == {(i, b) for i in ("alloy", "transformers")
                                                                 for b in (1, 8)}
    bytes_ = doc["weight_bytes_per_token"]  # 4.5 bits a weight (the head in 8.5) against 32
    assert bytes_["alloy"] < 0.3 * bytes_["transformers"]
    assert summary.main(["--dir", str(tmp_path)]) == 0
    headline = json.loads((tmp_path / "summary.json").read_text())["headline"]
    assert headline["decode_q4_0_ratio_tokens_per_s_b8"] > 0


def test_partition_tiny_plans_runs_and_matches_the_baseline_tokens(smoke):
    doc = tiny(smoke, "partition")
    alloy = [s for s in doc["samples"] if s["impl"] == "alloy"]
    assert {s["batch"] for s in alloy} == {1, 8}
    for s in alloy:  # the planned stages join up and cover the model
        stages = s["placement"]["stages"]
        assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == TINY_LAYERS
        assert all(a["layers"][1] == b["layers"][0] for a, b in zip(stages, stages[1:]))
        assert {st["device"] for st in stages} <= {"capped", "cpu"}
    assert doc["gpu_budget_bytes"] < doc["weight_bytes"]
    if importlib.util.find_spec("accelerate") is None:
        assert "accelerate is not installed: its side was skipped" in doc["notes"]
        pytest.skip("accelerate is not installed: the baseline side was not run")
    assert {s["batch"] for s in doc["samples"] if s["impl"] == "accelerate"} == {1, 8}
    # Same weights, fp32, greedy: Alloy's pipeline and transformers pick the same tokens.
    assert doc["summary"]["greedy_prefix_agreement_b1"] == doc["new_tokens"]


@pytest.mark.parametrize("name, args, message", [
    ("train", ["--device", "cuda"], "--device cuda needs CUDA"),
    ("decode", ["--device", "cpu", "--tiny", "--rounds", "0"], "--rounds must be >= 1"),
    ("partition", ["--device", "cpu", "--tiny", "--gpu-share", "1.5"], "--gpu-share must be between 0 and 1"),
])
def test_bad_arguments_fail_with_one_line(name, args, message):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is here")
    proc = run_entry(name, *args, timeout_s=60)
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1]


def test_summary_words_and_ratios():
    alloy = {"stages": [{"device": "cuda:0", "layers": [0, 7], "has_embed": True, "has_head": False},
                        {"device": "cpu", "layers": [7, 16], "has_embed": False, "has_head": True}]}
    assert summary.placement_words(alloy) == "cuda:0 layers 0-6 + embed | cpu layers 7-15 + head"
    accel = {"devices": {"0": {"layers": [1, 0], "modules": ["model.embed_tokens"]},
                         "cpu": {"layers": [2], "modules": ["lm_head"]}}}
    assert summary.placement_words(accel) == "0 layers 0-1 + model.embed_tokens | cpu layers 2-2 + lm_head"
    assert common.pairwise_ratios([2.0, 9.0, 4.0], [1.0, 3.0, 4.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_gpu_sh_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is here: the script would run for real")
def test_gpu_sh_without_cuda_fails_fast_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)})
    assert proc.returncode == 2 and "gpu.sh: no CUDA" in proc.stderr
    assert not out.exists()


def test_gpu_sh_smoke_on_cpu_writes_every_result_and_a_summary(smoke):
    assert sorted(p.name for p in smoke.iterdir()) == ["decode.json", "gpu.log", "partition.json", "summary.json",
                                                        "train.json"]  # the device tool returns at most 8 files
    doc = json.loads((smoke / "summary.json").read_text())
    assert doc["status"] == {"train": 0, "decode": 0, "partition": 0} and not doc["missing"]
    assert doc["environment"]["commit"] == "abc123" and doc["environment"]["versions"]["torch"]
    assert all(doc["results"][m]["samples"] for m in ("train", "decode", "partition"))
    assert doc["headline"]["train_ratio"] > 0 and "gpu.sh: done" in (smoke / "gpu.log").read_text()


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_sh_real_run_on_cuda(tmp_path):
    """The real thing: ~5 minutes on an H200. Every measurement finishes and Alloy's split is used."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=540,
                          env={**os.environ, "PYTHON": sys.executable, "OUT": str(out)})
    assert proc.returncode == 0, proc.stdout[-5000:]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["status"] == {"train": 0, "decode": 0, "partition": 0}, doc["status"]
    partition = doc["results"]["partition"]
    assert partition["weight_bytes"] > partition["gpu_cap_bytes"]  # the model does not fit the capped GPU
    devices = {st["device"] for s in partition["samples"] if s["impl"] == "alloy" for st in s["placement"]["stages"]}
    assert devices == {"cuda:0", "cpu"}
