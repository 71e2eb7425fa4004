"""ModelSpec <-> config.json: the adapters, both config generations, and refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alloy import ConfigError, ModelSpec, UnsupportedModelError
from alloy.checkpoint import resolve_spec
from alloy.spec import PRESETS
from hf_cases import CASES


def _hf_config(name):
    import transformers

    kind, kwargs = CASES[name]
    return transformers.AutoConfig.for_model(kind, **kwargs).to_dict()


@pytest.mark.parametrize("name", CASES)
def test_to_hf_config_round_trips(name):
    spec = ModelSpec.from_hf_config(_hf_config(name))
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


@pytest.mark.parametrize("name", CASES)
def test_transformers_reads_our_config_as_the_same_architecture(name):
    import transformers

    spec = ModelSpec.from_hf_config(_hf_config(name))
    ours = spec.to_hf_config()
    theirs = transformers.AutoConfig.for_model(ours.pop("model_type"), **ours).to_dict()
    assert ModelSpec.from_hf_config(theirs) == spec


def test_legacy_llama31_config_equals_the_transformers5_form():
    rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    base = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=131072, rms_norm_eps=1e-5)
    legacy = base | dict(rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", **rope))
    modern = base | dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, **rope))
    assert ModelSpec.from_hf_config(legacy) == ModelSpec.from_hf_config(modern)
    spec = ModelSpec.from_hf_config(legacy)
    assert (spec.rope_scaling, spec.rope_factor, spec.rope_theta) == ("llama3", 8.0, 500000.0)


def test_legacy_neox_rotary_pct_and_gemma_gelu():
    neox = ModelSpec.from_hf_config(dict(model_type="gpt_neox", vocab_size=50304, hidden_size=512,
                                         intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8,
                                         rotary_pct=0.25, rotary_emb_base=10000))
    assert neox.rotary_dim == 16 and neox.parallel_residual
    gemma = ModelSpec.from_hf_config(dict(model_type="gemma", vocab_size=256000, hidden_size=2048,
                                          intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
                                          num_key_value_heads=1, head_dim=256, hidden_act="gelu"))
    assert gemma.activation == "gelu_tanh"  # Gemma's "gelu" means the tanh approximation


def test_presets_resolve_and_count_parameters():
    counts = {name: resolve_spec(name).num_params() for name in PRESETS}
    # Published sizes: Llama 3.2 1B = 1.24B, Llama 3.1 8B = 8.03B, 70B = 70.6B, Qwen3-0.6B = 0.60B.
    assert abs(counts["llama-3.2-1b"] / 1.2358e9 - 1) < 0.01
    assert abs(counts["llama-3.1-8b"] / 8.030e9 - 1) < 0.01
    assert abs(counts["llama-3.1-70b"] / 70.55e9 - 1) < 0.01
    assert abs(counts["qwen3-0.6b"] / 0.596e9 - 1) < 0.01


@pytest.mark.parametrize("name", CASES)
def test_num_params_equals_the_transformers_model(name):
    import transformers

    from hf_cases import build_hf

    model = build_hf(name)
    spec = ModelSpec.from_hf_config(model.config.to_dict())
    expected = sum(p.numel() for n, p in model.named_parameters() if "pooler" not in n)
    assert spec.num_params() == expected


def test_unknown_model_type_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError, match="model_type 'mamba'.*supported: bert, gemma"):
        ModelSpec.from_hf_config({"model_type": "mamba", "hidden_size": 8})


@pytest.mark.parametrize("field,value,match", [
    ("rope_parameters", {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}, "rope_type='dynamic'"),
    ("hidden_act", "gelu_fast", "hidden_act='gelu_fast'"),
    ("num_local_experts", 8, "num_local_experts=8"),
])
def test_unsupported_knob_values_are_refused(field, value, match):
    cfg = _hf_config("llama-gqa") | {field: value}
    with pytest.raises(UnsupportedModelError, match=match):
        ModelSpec.from_hf_config(cfg)


def test_missing_field_and_non_json_config(tmp_path):
    cfg = _hf_config("llama-gqa")
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelSpec.from_hf_config(cfg)
    bad = tmp_path / "config.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelSpec.from_hf_config(bad)


_SPECS = st.builds(
    lambda kv, groups, hd, layers, window: ModelSpec(
        family="qwen2", qkv_bias=True, vocab_size=32, hidden_size=16, num_layers=layers, num_heads=kv * groups,
        num_kv_heads=kv, head_dim=hd, intermediate_size=24, max_seq_len=64, sliding_window=window,
        layer_types=tuple("sliding" if window and i % 2 else "full" for i in range(layers))),
    st.integers(1, 4), st.integers(1, 3), st.sampled_from([2, 4, 8]), st.integers(1, 6), st.sampled_from([0, 3]),
)


@given(_SPECS)
@settings(max_examples=50, deadline=None)
def test_spec_dict_round_trip(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert ModelSpec.from_dict(data) == spec
    assert ModelSpec.from_hf_config(spec.to_hf_config()) == spec


def test_spec_is_frozen_and_rejects_bad_values():
    spec = resolve_spec("tiny-llama")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.hidden_size = 3
    with pytest.raises(UnsupportedModelError, match="norm_placement='middle'"):
        spec.replace(norm_placement="middle")
    with pytest.raises(ConfigError, match="num_kv_heads"):
        spec.replace(num_kv_heads=3)
