"""Merging same-spec models: properties each method must have, and clear refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloy.cli import main
from alloy.errors import ConfigError
from alloy.fuse import merge
from alloy.fuse.merge import slerp, ties
from hf_cases import CHARS, build_hf


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three random Llamas of one spec (a base and two 'fine-tunes') and one of another spec."""
    root = tmp_path_factory.mktemp("models")
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        build_hf("llama-gqa", seed).save_pretrained(root / name)
    import transformers
    config = transformers.AutoConfig.for_model("llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "wider")
    return root


def _weights(directory):
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out |= load_file(path)
    return out


def _assert_same(got, want, atol=0.0):
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)


def test_linear_merge_of_a_model_with_itself_is_the_identity(models, tmp_path):
    out = merge([models / "a", models / "a"], tmp_path / "m", method="linear", weights=[0.3, 0.7])
    _assert_same(_weights(out), _weights(models / "a"), atol=1e-7)
    assert (out / "config.json").read_text() == (models / "a" / "config.json").read_text()


def test_linear_merge_is_the_weighted_mean(models, tmp_path):
    out = merge([models / "a", models / "b"], tmp_path / "m", weights=[1, 3])
    a, b = _weights(models / "a"), _weights(models / "b")
    _assert_same(_weights(out), {k: 0.25 * a[k] + 0.75 * b[k] for k in a}, atol=1e-6)


def test_task_arithmetic_with_weight_zero_returns_the_base(models, tmp_path):
    out = merge([models / "a"], tmp_path / "m", method="task-arithmetic", base=models / "base", weights=[0.0])
    _assert_same(_weights(out), _weights(models / "base"))
    one = merge([models / "a"], tmp_path / "one", method="task-arithmetic", base=models / "base", weights=[1.0])
    _assert_same(_weights(one), _weights(models / "a"), atol=1e-6)


def test_slerp_endpoints_return_the_inputs_and_the_midpoint_is_equiangular(models, tmp_path):
    a, b = _weights(models / "a"), _weights(models / "b")
    _assert_same(_weights(merge([models / "a", models / "b"], tmp_path / "t0", method="slerp", t=0.0)), a)
    _assert_same(_weights(merge([models / "a", models / "b"], tmp_path / "t1", method="slerp", t=1.0)), b)
    mid = _weights(merge([models / "a", models / "b"], tmp_path / "mid", method="slerp", t=0.5))
    assert all(not torch.equal(mid[k], a[k]) and not torch.equal(mid[k], b[k]) for k in a)


def test_slerp_follows_the_arc_between_equal_norm_tensors():
    a = torch.randn(64, dtype=torch.float64)
    b = torch.randn(64, dtype=torch.float64)
    b = b * a.norm() / b.norm()
    theta = torch.arccos(a @ b / (a.norm() * b.norm()))
    for t in (0.25, 0.5, 0.9):
        x = slerp(a, b, t)
        assert x.norm().item() == pytest.approx(a.norm().item(), rel=1e-9)  # stays on the sphere
        angle = torch.arccos(x @ a / (x.norm() * a.norm()))
        assert angle.item() == pytest.approx(t * theta.item(), rel=1e-6)


def test_ties_elects_signs_and_averages_only_the_agreeing_values():
    base = torch.zeros(3)
    m1, m2 = torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 1.0, -4.0])
    # entry 0: both positive -> mean 2; entry 1: the votes cancel -> 0; entry 2: the sum is negative -> -4
    assert torch.equal(ties([m1, m2], base, [1.0, 1.0], density=1.0), torch.tensor([2.0, 0.0, -4.0]))
    # density 1/3 keeps each task vector's single largest entry: [0, 0, 2] and [0, 0, -4] -> -4
    assert torch.equal(ties([m1, m2], base, [1.0, 1.0], density=1 / 3), torch.tensor([0.0, 0.0, -4.0]))


def test_ties_of_one_model_is_that_model_and_of_the_base_is_the_base(models, tmp_path):
    one = merge([models / "a"], tmp_path / "one", method="ties", base=models / "base")
    _assert_same(_weights(one), _weights(models / "a"), atol=1e-6)
    same = merge([models / "base", models / "base"], tmp_path / "same", method="ties", base=models / "base",
                 density=0.5)
    _assert_same(_weights(same), _weights(models / "base"))


def test_a_spec_mismatch_names_the_first_differing_knob(models, tmp_path):
    with pytest.raises(ConfigError, match="differ in intermediate_size: 48 vs 64"):
        merge([models / "a", models / "wider"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_a_missing_tensor_is_named(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models / "b", broken)
    weights = _weights(broken)
    del weights["model.norm.weight"]
    for path in broken.glob("*.safetensors"):
        path.unlink()
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(ConfigError, match="has no tensor 'model.norm.weight'"):
        merge([models / "a", broken], tmp_path / "m")
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]


def test_cli_merges_and_refuses_in_one_line(models, tmp_path, capsys):
    assert main(["merge", str(models / "a"), str(models / "b"), "--method", "slerp", "--t", "0.3",
                 "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "merge.json").is_file()
    assert main(["merge", str(models / "a"), str(models / "b"), "--method", "ties", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "give --base" in err


def _with_tokenizer(source, directory, vocab: list[str], indent=None):
    from tokenizers import Tokenizer, models

    shutil.copytree(source, directory)
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(vocab)}, merges=[]))
    (directory / "tokenizer.json").write_text(json.dumps(json.loads(tokenizer.to_str()), indent=indent))
    return directory


def test_models_with_different_tokenizers_merge_only_when_told_which_to_keep(models, tmp_path, capsys):
    a = _with_tokenizer(models / "a", tmp_path / "a", CHARS)
    b = _with_tokenizer(models / "b", tmp_path / "b", CHARS[::-1])  # the same characters, other ids
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different tokenizers (tokenizer.json differ)" in err and "--tokenizer" in err
    assert not (tmp_path / "m").exists()
    assert main(["merge", str(a), str(b), "--tokenizer", str(b), "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    with pytest.raises(ConfigError, match="not one of the merged models"):
        merge([a, b], tmp_path / "n", tokenizer=models / "base")
    # the same tokenizer written another way (here: indented) is the same tokenizer
    same = _with_tokenizer(models / "b", tmp_path / "same", CHARS, indent=2)
    merge([a, same], tmp_path / "o")
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
