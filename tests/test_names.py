"""One name per concept: a plan's device name -> torch device (one rule for training and
generation), dtype names (checkpoint weights vs decode formats), the tokenizer side files, and
the seed example's modules defined once."""

from __future__ import annotations

import pytest
import torch

from alloy.checkpoint.io import DTYPES, SIDE_FILES, TOKENIZER_FILES, read_side_files, torch_dtype
from alloy.devices import DeviceProfile, torch_device
from alloy.errors import ConfigError
from alloy.infer import partition
from alloy.infer.optimize import DTYPES as DECODE_DTYPES, decode_dtype


def _profile(name: str, kind: str) -> DeviceProfile:
    return DeviceProfile(name=name, kind=kind, memory_bytes=1 << 30, matmul_flops={"fp32": 1e12},
                         memory_bandwidth_bytes_per_s=1e11)


@pytest.mark.parametrize("local_rank", [None, "0", "2", "5"])
def test_a_cuda_name_without_an_index_is_the_local_ranks_gpu_else_gpu_0(monkeypatch, local_rank):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    mine = torch.device(f"cuda:{local_rank or 0}")
    assert torch_device("cuda") == mine
    assert torch_device("a100-3", "cuda") == mine  # a declared name says nothing of the index
    assert torch_device("rank1/cuda:0", "cuda") == mine  # only a leading "cuda:N" names one
    assert torch_device("cuda:3") == torch_device("cuda:3", "cuda") == torch.device("cuda:3")
    assert torch_device("cpu") == torch_device("cpu-q0.5", "cpu") == torch.device("cpu")
    assert torch_device("gpu", "mps") == torch.device("mps")


@pytest.mark.parametrize("local_rank", [None, "1"])
def test_generation_places_a_plans_stage_by_the_same_rule(monkeypatch, local_rank):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for name, kind in [("cuda", "cuda"), ("cuda:3", "cuda"), ("l4-7", "cuda"), ("cpu", "cpu"), ("cpu-q1", "cpu")]:
        assert partition._stage_device(_profile(name, kind), name) == str(torch_device(name, kind)), name
    assert partition._stage_device(None, "cuda:2") == "cuda:2"
    with pytest.raises(ConfigError, match="no such CUDA device"):
        partition._stage_device(_profile("cuda:4", "cuda"), "cuda:4")
    with pytest.raises(ConfigError, match="cannot drive"):
        partition._stage_device(_profile("mps", "mps"), "mps")


def test_torch_dtype_maps_weight_dtype_names_and_passes_dtypes_through():
    assert [torch_dtype(n) for n in ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")] == [
        torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16, torch.float16]
    assert torch_dtype(torch.float16) is torch.float16 and torch_dtype(None) is None
    for name in ("int8", "q8_0", "fp64", "BF16"):
        with pytest.raises(ConfigError, match=f"unknown dtype '{name}'; choose from fp32, float32, bf16"):
            torch_dtype(name)


def test_decode_dtype_accepts_exactly_the_formats_prepare_decodes_in():
    assert [decode_dtype(n) for n in DECODE_DTYPES] == list(DECODE_DTYPES)
    assert {"fp32", "bf16", "int8", "q8_0", "q4_k"} <= set(DECODE_DTYPES)
    for name in ("fp16", "bfloat16", "q5_k"):  # weights dtypes a checkpoint may hold, not decode formats
        with pytest.raises(ConfigError, match=f"unknown dtype '{name}' for generation"):
            decode_dtype(name)
    assert "fp16" in DTYPES and "int8" not in DTYPES


def test_one_list_of_side_files_and_one_reader(tmp_path):
    assert TOKENIZER_FILES == tuple(n for n in SIDE_FILES if n != "generation_config.json")
    present = ["tokenizer_config.json", "chat_template.jinja", "generation_config.json", "merges.txt"]
    for i, name in enumerate(present):
        (tmp_path / name).write_bytes(f"{name} {i}".encode())
    (tmp_path / "config.json").write_text("{}")  # beside the weights, not a side file
    (tmp_path / "notes.txt").write_text("not a side file")
    assert read_side_files(tmp_path) == {n: f"{n} {i}".encode() for i, n in enumerate(present)}
    assert read_side_files(str(tmp_path / "missing")) == {}


def test_the_seed_examples_modules_define_their_names_once():
    import alloy.callbacks
    import alloy.data
    import alloy.framework
    import alloy.layers
    import alloy.text

    for module in (alloy.callbacks, alloy.data, alloy.layers, alloy.text):
        for name in module.__all__:
            home = getattr(module, name).__module__  # torch's own (nn.Sequential) may be handed on
            assert home == module.__name__ or not home.startswith("alloy"), (module.__name__, name, home)
    assert alloy.framework.Callback is alloy.callbacks.Callback
    assert alloy.framework.read_table is alloy.data.read_table
    assert alloy.layers is alloy.__getattr__("layers")
