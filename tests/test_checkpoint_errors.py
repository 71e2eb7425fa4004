"""Bad checkpoints: each gets a typed error with a one-line message, and the CLI no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import alloy
from alloy import CheckpointError, ConfigError, UnsupportedModelError
from hf_cases import build_hf


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    build_hf("llama-gqa").save_pretrained(directory)
    return directory


@pytest.fixture
def bad_dir(good_dir, tmp_path):
    directory = tmp_path / "model"
    shutil.copytree(good_dir, directory)
    return directory


def _edit_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _cli_error(directory) -> str:
    """Run `alloy inspect DIR --check` in a real process; return its one-line error."""
    proc = subprocess.run([sys.executable, "-m", "alloy", "inspect", str(directory), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_good_checkpoint_passes_the_cli_check(good_dir):
    proc = subprocess.run([sys.executable, "-m", "alloy", "inspect", str(good_dir), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "weights OK" in proc.stdout


def test_unknown_model_type(bad_dir):
    config = json.loads((bad_dir / "config.json").read_text()) | {"model_type": "mamba"}
    (bad_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="'mamba' is not supported"):
        alloy.load(bad_dir)
    assert "mamba" in _cli_error(bad_dir)


def test_missing_tensor(bad_dir):
    _edit_weights(bad_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing layers\.1\.mlp\.up_proj\.weight"):
        alloy.load(bad_dir)
    assert "missing" in _cli_error(bad_dir)


def test_extra_tensor(bad_dir):
    _edit_weights(bad_dir, lambda t: t.update({"model.layers.0.adapter.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected layers\.0\.adapter\.weight"):
        alloy.load(bad_dir)
    assert "unexpected" in _cli_error(bad_dir)


def test_wrong_shape(bad_dir):
    _edit_weights(bad_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(8, 32)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \[8, 32\].*\[16, 32\]"):
        alloy.load(bad_dir)
    assert "shape" in _cli_error(bad_dir)


def test_truncated_safetensors(bad_dir):
    path = bad_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        alloy.load(bad_dir)
    assert "safetensors" in _cli_error(bad_dir)


def test_corrupt_safetensors_header(bad_dir):
    (bad_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json header}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        alloy.load(bad_dir)
    _cli_error(bad_dir)


def test_config_that_is_not_json(bad_dir):
    (bad_dir / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="not valid JSON"):
        alloy.load(bad_dir)
    assert "not valid JSON" in _cli_error(bad_dir)


def test_directory_without_weights(bad_dir):
    (bad_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights \(\*\.safetensors\)"):
        alloy.load(bad_dir)
    assert "no weights" in _cli_error(bad_dir)


def test_pickled_weights_are_refused_not_unpickled(bad_dir):
    (bad_dir / "model.safetensors").unlink()
    (bad_dir / "pytorch_model.bin").write_bytes(b"\x80\x04would-be-pickle")
    with pytest.raises(CheckpointError, match="safetensors only"):
        alloy.load(bad_dir)
    _cli_error(bad_dir)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        alloy.load(tmp_path / "nowhere")


def test_unknown_dtype(good_dir):
    with pytest.raises(ConfigError, match="unknown dtype 'fp13'"):
        alloy.load(good_dir, dtype="fp13")


def test_failed_save_leaves_the_target_untouched(good_dir, tmp_path):
    target = tmp_path / "out"
    alloy.save(alloy.load(good_dir), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    stage = alloy.load(good_dir, layers=(0, 2))
    with pytest.raises(CheckpointError, match="cannot save a slice"):
        alloy.save(stage, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging dir left behind


def test_sharded_save_and_load(good_dir, tmp_path):
    model = alloy.load(good_dir)
    out = alloy.save(model, tmp_path / "sharded", max_shard_bytes=20_000)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(alloy.load(out)(ids), model(ids), atol=0, rtol=0)
