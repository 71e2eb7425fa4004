"""`alloy plan` end to end: the example clusters, and bad input refused in one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alloy.devices import Inventory
from alloy.plan import Plan, Workload, fast_dtype, make_plan
from alloy.checkpoint import resolve_spec

ROOT = Path(__file__).resolve().parents[1]
ALLOY = str(Path(sys.executable).with_name("alloy"))
CLUSTERS = sorted((ROOT / "examples" / "clusters").glob("*.json"))
MODEL_FOR = {"emulated-2core": "tiny-llama"}  # the 2-core machine's CPU slices hold 8 GiB each
TINY_CLUSTER = {"devices": [
    {"name": "fast", "kind": "cpu", "memory_bytes": 2**31, "matmul_flops": {"fp32": 4e11},
     "memory_bandwidth_bytes_per_s": 3e10},
    {"name": "slow", "kind": "cpu", "memory_bytes": 2**31, "matmul_flops": {"fp32": 1e11},
     "memory_bandwidth_bytes_per_s": 1e10},
]}


def test_example_clusters_exist():
    assert CLUSTERS, "examples/clusters/*.json is empty"


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_example_cluster_is_planned_and_beats_the_baselines(path):
    model = MODEL_FOR.get(path.stem, "llama-3.2-1b")
    inventory = Inventory.load(path)
    plan = make_plan(resolve_spec(model), inventory,
                     Workload(task="train", batch_size=16, seq_len=512, checkpointing=True,
                              dtype=fast_dtype(inventory)))
    fitting = [b for b in plan.baselines if b.step_s is not None]
    gains = ", ".join(f"{b.name} {b.speedup:.2f}x" if b.speedup else f"{b.name} (does not fit)"
                      for b in plan.baselines)
    print(f"\n{path.stem} ({model}): step {plan.predicted.step_s:.3g} s, {len(plan.replicas)} replicas, "
          f"{plan.world_size} ranks; faster than {gains}")
    # The baselines are layouts in (or near) the searched space: the plan must never lose to one.
    for b in fitting:
        assert b.speedup >= 0.999, f"{b.name} beats the plan: {b.speedup:.3f}x"


def alloy_plan(*args, tmp_path=None):
    return subprocess.run([ALLOY, "plan", *args], capture_output=True, text=True, cwd=tmp_path or ROOT,
                          timeout=120)


def test_cli_writes_json_and_png(tmp_path):
    cluster = tmp_path / "cluster.json"
    cluster.write_text(json.dumps(TINY_CLUSTER))
    pytest.importorskip("matplotlib")  # the optional [plot] extra
    done = alloy_plan("--model", "tiny-llama", "--devices", str(cluster), "--batch-size", "4", "--seq-len",
                      "128", "--dtype", "fp32", "--json", "--out", str(tmp_path / "p.json"), "--png",
                      str(tmp_path / "p.png"))
    assert done.returncode == 0, done.stderr
    assert Plan.load(tmp_path / "p.json") == Plan.model_validate_json(done.stdout)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def assert_refused(done, *phrases):
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alloy plan: error:"), done.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.fixture
def cluster(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text(json.dumps(TINY_CLUSTER))
    return str(path)


def test_unknown_device_name(cluster):
    assert_refused(alloy_plan("--model", "tiny-llama", "--devices", cluster, "--use", "fast,gpu9"),
                   "unknown device 'gpu9'")


def test_empty_device_list(cluster):
    assert_refused(alloy_plan("--model", "tiny-llama", "--devices", cluster, "--use", ""), "device list is empty")


def test_zero_memory_device(tmp_path):
    data = json.loads(json.dumps(TINY_CLUSTER))
    data["devices"][1]["memory_bytes"] = 0
    path = tmp_path / "zero.json"
    path.write_text(json.dumps(data))
    assert_refused(alloy_plan("--model", "tiny-llama", "--devices", str(path)), "memory_bytes")


def test_batch_smaller_than_replica_count(cluster):
    assert_refused(alloy_plan("--model", "tiny-llama", "--devices", cluster, "--replicas", "2",
                              "--batch-size", "1"), "smaller than the 2 replicas")


def test_seq_len_over_model_maximum(cluster):
    assert_refused(alloy_plan("--model", "tiny-llama", "--devices", cluster, "--seq-len", "4096"),
                   "over the model's maximum of 512")


def test_malformed_cluster_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"devices": [ {"name": "x",')
    assert_refused(alloy_plan("--model", "tiny-llama", "--devices", str(path)), "not valid JSON")
