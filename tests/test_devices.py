"""Devices: discovery here, measured profiles against direct timings, the JSON schema, declared
clusters (good and malformed), and the `alloy devices` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from alloy.cli import main
from alloy.devices import Inventory, discover, profile
from alloy.devices.measure import TORCH_DTYPES, measure
from alloy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((ROOT / "examples" / "clusters").glob("*.json"))
ALLOY = Path(sys.executable).with_name("alloy")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """A private device cache, holding one short measurement of this machine."""
    cache = tmp_path_factory.mktemp("alloy-cache")
    old = os.environ.get("ALLOY_CACHE_DIR")
    os.environ["ALLOY_CACHE_DIR"] = str(cache)
    inventory = profile(budget_s=1.0)
    yield cache, inventory
    if old is None:
        del os.environ["ALLOY_CACHE_DIR"]
    else:
        os.environ["ALLOY_CACHE_DIR"] = old


def _direct_matmul_flops(n: int, dtype: torch.dtype, seconds: float, device: str = "cpu") -> float:
    """Plain torch.matmul in a loop: the reference the profile must agree with."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.matmul(a, b)
        calls += 1
        if device != "cpu":
            torch.cuda.synchronize()
    return 2 * n**3 * calls / (time.perf_counter() - start)


def _cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_discover_finds_this_cpu():
    found = discover()
    cpu = found[0]
    assert cpu.name == "cpu" and cpu.kind == "cpu" and cpu.model
    assert cpu.threads == min(len(os.sched_getaffinity(0)), torch.get_num_threads())
    total_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < cpu.free_memory_bytes <= cpu.memory_bytes <= total_bytes
    assert set(cpu.isa_flags) <= _cpuinfo_flags()
    assert cpu.facts["cores"] == sorted(os.sched_getaffinity(0))
    assert sum(d.kind == "cuda" for d in found) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_measured_cpu_matmul_rate_agrees_with_direct_timing():
    direct_before = _direct_matmul_flops(1024, torch.float32, 0.7)
    measured = measure(discover()[0], budget_s=1.5)
    direct_after = _direct_matmul_flops(1024, torch.float32, 0.7)
    direct = (direct_before + direct_after) / 2  # the machine is shared: average out a neighbour's burst
    assert direct / 2 < measured.matmul_flops["fp32"] < direct * 2, (measured.matmul_flops, direct_before, direct_after)
    assert measured.memory_bandwidth_bytes_per_s > 1e8 and measured.measured


def test_slow_dtypes_are_truly_slow_and_fast_ones_are_timed(cache_env):
    cpu = cache_env[1].device("cpu")
    assert "fp32" in cpu.matmul_flops
    for dtype in ("bf16", "fp16"):
        assert (dtype in cpu.matmul_flops) != (dtype in cpu.slow_dtypes), dtype
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: small 2-thread matmuls on a busy machine time the waiting
    try:
        fp32 = _direct_matmul_flops(256, torch.float32, 0.3)
        for dtype, reason in cpu.slow_dtypes.items():
            assert "no fast path" in reason
            assert _direct_matmul_flops(256, TORCH_DTYPES[dtype], 0.3) < 0.5 * fp32, dtype
    finally:
        torch.set_num_threads(threads)
    if not {"avx512_bf16", "amx_bf16", "bf16"} & _cpuinfo_flags():
        assert "bf16" in cpu.slow_dtypes


def test_measuring_this_machine_is_cached_by_fingerprint(cache_env):
    cache, first = cache_env
    path = cache / "devices" / f"{first.fingerprint}.json"
    assert path.is_file()
    start = time.perf_counter()
    again = profile()
    assert time.perf_counter() - start < 1.0  # read, not re-measured
    assert again.device("cpu").matmul_flops == first.device("cpu").matmul_flops
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # fewer threads is different hardware as far as rates go
        assert profile(budget_s=0.3).fingerprint != first.fingerprint
    finally:
        torch.set_num_threads(threads)


def test_refresh_re_measures(cache_env):
    cache, first = cache_env
    path = cache / "devices" / f"{first.fingerprint}.json"
    before = path.stat().st_mtime_ns
    refreshed = profile(refresh=True, budget_s=0.3)
    assert path.stat().st_mtime_ns > before and refreshed.fingerprint == first.fingerprint
    assert Inventory.load(path) == refreshed


def test_profile_round_trip(tmp_path, cache_env):
    inventory = cache_env[1]
    inventory.save(tmp_path / "inv.json")
    loaded = Inventory.load(tmp_path / "inv.json")
    assert loaded == inventory
    assert json.loads((tmp_path / "inv.json").read_text())["schema_version"] == 1


@pytest.mark.parametrize("path", CLUSTERS, ids=[p.stem for p in CLUSTERS])
def test_example_cluster_validates(path):
    inventory = Inventory.load(path)
    assert len(inventory.devices) >= 2 and not any(d.measured for d in inventory.devices)
    for device in inventory.devices:
        # Declared figures are sustained rates: below every datasheet peak (H200 bf16 989 TFLOP/s).
        assert all(0 < rate < 1e15 for rate in device.matmul_flops.values())
        assert not set(device.matmul_flops) & set(device.slow_dtypes)
    assert Inventory.parse(inventory.to_json()) == inventory


def test_count_and_nodes_expand_as_declared():
    helix = Inventory.load(ROOT / "examples/clusters/helix-24.json")
    assert len(helix.devices) == 24 and len({d.node for d in helix.devices}) == 24
    assert helix.link("a100-0", "t4-11").bandwidth_bytes_per_s < 1.25e9  # 10 GbE
    box = Inventory.load(ROOT / "examples/clusters/mixed-gpu-node.json")
    assert [d.name for d in box.devices] == ["a100-80g", "a100-40g", "v100-0", "v100-1", "t4-0", "t4-1"]


def _workstation() -> dict:
    return json.loads((ROOT / "examples/clusters/workstation.json").read_text())


def test_negative_bandwidth_is_rejected_naming_the_field():
    doc = _workstation()
    doc["devices"][1]["memory_bandwidth_bytes_per_s"] = -1e9
    with pytest.raises(ConfigError, match=r"devices\.1\.memory_bandwidth_bytes_per_s"):
        Inventory.parse(doc)


def test_negative_link_bandwidth_is_rejected_naming_the_field():
    doc = _workstation()
    doc["links"] = [{"a": "cpu", "b": "rtx4090", "bandwidth_bytes_per_s": -1}]
    with pytest.raises(ConfigError, match=r"links\.0\.bandwidth_bytes_per_s"):
        Inventory.parse(doc)


def test_unknown_dtype_is_rejected_naming_the_field():
    doc = _workstation()
    doc["devices"][2]["matmul_flops"]["fp64"] = 1e12
    with pytest.raises(ConfigError, match=r"devices\.2\.matmul_flops\.fp64"):
        Inventory.parse(doc)


def test_missing_memory_is_rejected_naming_the_field():
    doc = _workstation()
    del doc["devices"][0]["memory_bytes"]
    with pytest.raises(ConfigError, match=r"devices\.0\.memory_bytes: Field required"):
        Inventory.parse(doc)


def test_cli_bad_cluster_file_is_one_line_exit_2(tmp_path):
    doc = _workstation()
    doc["devices"][1]["matmul_flops"]["fp64"] = 1e12
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    done = subprocess.run([str(ALLOY), "devices", "--declare", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("alloy devices: error:") and "matmul_flops.fp64" in done.stderr


def test_cli_missing_or_broken_file_exits_2(tmp_path, capsys):
    assert main(["devices", "--declare", str(tmp_path / "nope.json")]) == 2
    (tmp_path / "broken.json").write_text("{ not json")
    assert main(["devices", "--declare", str(tmp_path / "broken.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "no such device/cluster file" in err[0] and "not valid JSON" in err[1]


def test_cli_declare_prints_table_and_json(capsys):
    path = ROOT / "examples/clusters/amp-v100-t4.json"
    assert main(["devices", "--declare", str(path)]) == 0
    table = capsys.readouterr().out
    assert "t4-3" in table and "v100-0" in table and "links" in table
    assert main(["devices", "--declare", str(path), "--json"]) == 0
    assert Inventory.parse(capsys.readouterr().out) == Inventory.load(path)


def test_cli_devices_reads_the_cache_in_a_new_process(cache_env):
    cache, first = cache_env
    env = dict(os.environ, ALLOY_CACHE_DIR=str(cache))
    done = subprocess.run([str(ALLOY), "devices", "--json"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    shown = Inventory.parse(done.stdout)
    assert shown.fingerprint == first.fingerprint  # same hardware seen from another process
    cached = Inventory.load(cache / "devices" / f"{first.fingerprint}.json")
    assert shown.device("cpu").matmul_flops == cached.device("cpu").matmul_flops


def test_cli_devices_table(cache_env, capsys):
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "cpu" in out and "fp32 TFLOP/s" in out and "from cache" in out


def test_cli_unknown_device_or_bad_budget_exits_2(cache_env, capsys):
    assert main(["devices", "--device", "cuda:7"]) == 2
    assert "no device cuda:7 here" in capsys.readouterr().err
    assert main(["devices", "--refresh", "--budget-s", "0"]) == 2
    assert "budget_s must be > 0" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_is_discovered_and_measured():
    found = [d for d in discover() if d.kind == "cuda"]
    assert len(found) == torch.cuda.device_count()
    gpu = found[0]
    assert gpu.compute_capability and 0 < gpu.free_memory_bytes <= gpu.memory_bytes
    measured = measure(gpu, budget_s=1.5)
    assert measured.host_link_bytes_per_s > 1e9 and measured.memory_bandwidth_bytes_per_s > 1e10
    dtype = "bf16" if "bf16" in measured.matmul_flops else "fp32"
    direct = _direct_matmul_flops(4096, TORCH_DTYPES[dtype], 0.5, device="cuda:0")
    assert direct / 2 < measured.matmul_flops[dtype] < direct * 2, (measured.matmul_flops, direct)


def test_layer_probe_takes_batch_sizes_in_any_order():
    """`bench hetero --quick` once crashed: it asked for batches (1, 2, 4, 8, 7), and the profile
    refused them ("batch sizes must be strictly increasing"). The probe sorts and de-duplicates."""
    from alloy.runtime.layer_profile import measure_layer_times
    from alloy.spec import ModelSpec

    spec = ModelSpec(family="llama", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
                     head_dim=8, intermediate_size=32, max_seq_len=32)
    times = measure_layer_times(spec, 8, (1, 4, 2, 4, 3), repeats=1)
    assert times.batch == [1.0, 2.0, 3.0, 4.0] and len(times.layer_s) == 4 and all(t > 0 for t in times.layer_s)
