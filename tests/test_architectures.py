"""Issue 22's architectures beyond the shared parity suite: each new knob must change the output
(so parity in test_model_parity cannot pass vacuously), LongRoPE past its original length,
MoE routing and loading per layer range, the CLI end to end, the planner on MoE specs."""

from __future__ import annotations

import json

import pytest
import torch

import alloy
from alloy import ConfigError, ModelSpec, UnsupportedModelError
from alloy.cli import main
from alloy.model.moe import MoE
from alloy.plan.cost import Workload, model_costs
from hf_cases import CASES, build_hf, char_tokenizer, hf_output

VOCAB = 96
TOLERANCE = 1e-4


def _ids(batch=2, seq=16, seed=0):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _out(model, ids):
    with torch.no_grad():
        return model(ids)


def _with_spec(model, **changes):
    """The same weights under a spec with `changes` (knobs that add or remove no parameter)."""
    other = alloy.Transformer(model.spec.replace(**changes)).eval()
    other.load_state_dict(model.state_dict())
    return other


def _differs(model, **changes) -> float:
    ids = _ids()
    return (_out(model, ids) - _out(_with_spec(model, **changes), ids)).abs().max().item()


# ---- RoPE scaling -----------------------------------------------------------------------------

def test_yarn_factor_and_attention_factor_change_the_logits(saved):
    _, directory = saved("llama-yarn")
    model = alloy.load(directory)
    assert model.spec.rope_scaling == "yarn" and model.spec.rope_attention_factor > 1
    assert _differs(model, rope_factor=1.0, rope_attention_factor=1.0) > 1e-2
    assert _differs(model, rope_attention_factor=1.0) > 1e-2  # mscale alone matters
    assert _differs(model, rope_scaling="none", rope_attention_factor=1.0) > 1e-2


def test_yarn_mscale_ratio_as_transformers_infers_it(saved):
    import math

    _, directory = saved("qwen2-yarn-mscale")
    spec = alloy.load(directory).spec

    def mscale(m):
        return 0.1 * m * math.log(8.0) + 1.0

    assert spec.rope_attention_factor == pytest.approx(mscale(1.0) / mscale(0.5))
    assert not spec.rope_truncate


def test_longrope_past_the_original_length_matches_transformers(saved):
    hf, directory = saved("phi3-longrope")
    model = alloy.load(directory)
    original = model.spec.rope_original_max_seq_len
    ids = _ids(seq=original + 8)  # past the original length: transformers switches to the long factors
    torch.testing.assert_close(_out(model, ids), hf_output(hf, ids), atol=TOLERANCE, rtol=0)
    # ... which do change the output, as do the short ones within the original length
    long_as_short = _with_spec(model, rope_long_factor=model.spec.rope_short_factor)
    assert (_out(model, ids) - _out(long_as_short, ids)).abs().max() > 1e-2
    assert _differs(model, rope_short_factor=(1.0,) * 4) > 1e-2
    assert _differs(model, rope_attention_factor=1.0) > 1e-2


def test_longrope_cached_decoding_across_the_original_length_matches_transformers(saved):
    """The prompt runs on the short factors, steps past the original length on the long ones, as
    transformers' cached forward does. (Phi-3's `generate` also recomputes the whole sequence
    once at the crossing; Alloy's generate does not, so greedy tokens may differ from there on.)"""
    from transformers import DynamicCache

    hf, directory = saved("phi3-longrope")
    model = alloy.load(directory)
    original = model.spec.rope_original_max_seq_len
    ids = _ids(batch=1, seq=original + 5, seed=3)
    cache, hf_cache = model.new_cache(1, original + 5), DynamicCache(config=hf.config)
    prefill = original - 3
    with torch.no_grad():
        steps = [(model(ids[:, :prefill], cache=cache),
                  hf(ids[:, :prefill], past_key_values=hf_cache, use_cache=True).logits)]
        for t in range(prefill, original + 5):
            steps.append((model(ids[:, t:t + 1], cache=cache),
                          hf(ids[:, t:t + 1], past_key_values=hf_cache, use_cache=True).logits))
    for got, expected in steps:
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


# ---- Gemma 3 ----------------------------------------------------------------------------------

def test_gemma3_local_base_sliding_pattern_and_qk_norm(saved):
    hf, directory = saved("gemma3")
    model = alloy.load(directory)
    spec = model.spec
    assert spec.layer_types == ("sliding", "full", "sliding")  # sliding_window_pattern=2
    assert spec.rope_local_theta == 10.0 and spec.rope_theta == 1e6 and spec.rope_scaling == "linear"
    assert spec.qk_norm and spec.norm_placement == "sandwich" and spec.final_softcap == 2.0
    assert _differs(model, rope_local_theta=0.0) > 1e-2  # sliding layers on the global table instead
    assert _differs(model, rope_local_theta=1e6) > 1e-2
    assert _differs(model, rope_scaling="none") > 1e-2  # the full layer's linear scaling
    # q_norm / k_norm weights are not the identity, so parity exercises them
    assert (model.layers["0"].attn.q_norm.weight - 0).abs().max() > 0.05


def test_gemma3_older_config_form_reads_the_same():
    """rope_theta / rope_local_base_freq / rope_scaling / sliding_window_pattern (transformers 4)."""
    _, kwargs = CASES["gemma3"]
    base = {k: v for k, v in kwargs.items() if k not in ("rope_parameters", "sliding_window_pattern")}
    modern = ModelSpec.from_hf_config({"model_type": "gemma3_text", **kwargs})
    legacy = ModelSpec.from_hf_config({"model_type": "gemma3_text", **base, "rope_theta": 1e6,
                                       "rope_local_base_freq": 10.0, "sliding_window_pattern": 2,
                                       "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    assert legacy == modern
    six = ModelSpec.from_hf_config({"model_type": "gemma3_text", **base, "num_hidden_layers": 12})
    assert six.layer_types == (("sliding",) * 5 + ("full",)) * 2  # 5 local : 1 global by default


def test_olmo2_output_norms_change_the_logits(saved):
    _, directory = saved("olmo2")
    model = alloy.load(directory)
    assert model.spec.norm_placement == "output" and not model.spec.qk_norm_per_head
    assert _differs(model, norm_placement="pre") > 1e-2


# ---- Mixture of experts -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "qwen3-moe", "olmoe"])
def test_moe_top_k_changes_the_logits(name, saved):
    _, directory = saved(name)
    model = alloy.load(directory)
    assert model.spec.num_experts == 4 and model.spec.experts_per_token == 2
    assert _differs(model, experts_per_token=1) > 1e-2
    assert _differs(model, router_renormalize=not model.spec.router_renormalize) > 1e-2


def test_moe_routing_matches_transformers_router(saved):
    """Weights and expert ids per token equal the transformers router's, renormalised or not."""
    for name in ("qwen3-moe", "olmoe", "mixtral"):
        hf, directory = saved(name)
        model = alloy.load(directory)
        x = torch.randn(10, model.spec.hidden_size)
        hf_block = hf.model.layers[0].mlp
        with torch.no_grad():
            _, hf_weights, hf_experts = hf_block.gate(x)
            weights, experts = model.layers["0"].mlp.route(x)
        assert torch.equal(experts, hf_experts)
        torch.testing.assert_close(weights, hf_weights, atol=1e-6, rtol=0)


def test_qwen3_moe_dense_layers_and_layer_range_loading(saved):
    _, directory = saved("qwen3-moe")
    spec = alloy.load(directory).spec
    assert spec.dense_layers == (1,) and spec.expert_intermediate_size == 24
    stage = alloy.load(directory, layers=(1, 3), head=False)
    assert not isinstance(stage.layers["1"].mlp, MoE) and isinstance(stage.layers["2"].mlp, MoE)
    names = set(stage.state_dict())
    assert "layers.2.mlp.experts.3.down.weight" in names
    assert not any(n.startswith("layers.0.") for n in names)  # only the stage's own experts are read


@pytest.mark.parametrize("changes,error,match", [
    (dict(experts_per_token=5), ConfigError, "experts_per_token must be from 1 to num_experts=4"),
    (dict(experts_per_token=0), ConfigError, "experts_per_token"),
    (dict(dense_layers=(7,)), ConfigError, "dense_layers has layer 7"),
])
def test_bad_moe_specs_get_one_line_errors(changes, error, match, saved):
    _, directory = saved("qwen3-moe")
    spec = alloy.load(directory).spec
    with pytest.raises(error, match=match):
        spec.replace(**changes)


@pytest.mark.parametrize("name,patch,error,match", [
    ("mixtral", {"num_experts_per_tok": 9}, ConfigError, "experts_per_token must be from 1 to num_experts=4"),
    ("olmoe", {"clip_qkv": 8.0}, UnsupportedModelError, "clip_qkv"),
    ("llama-yarn", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, UnsupportedModelError,
     "rope_type='dynamic'"),
    ("phi3-longrope", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     ConfigError, "short_factor and long_factor need 4 entries"),
    ("llama-yarn", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -1.0}}, ConfigError,
     "beta_fast"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "default"},
                                    "sliding_attention": {"rope_type": "linear", "factor": 2.0}}},
     UnsupportedModelError, "sliding layers with scaled RoPE"),
    # found by hypothesis: 0 read as "intermediate_size" and written back as 48
    ("qwen3-moe", {"moe_intermediate_size": 0}, ConfigError, "moe_intermediate_size must be a positive integer"),
])
def test_bad_configs_get_one_line_errors(name, patch, error, match):
    kind, kwargs = CASES[name]
    with pytest.raises(error, match=match) as info:
        ModelSpec.from_hf_config({"model_type": kind, **kwargs, **patch})
    assert "\n" not in str(info.value)


def test_planner_counts_all_experts_for_memory_and_active_ones_for_flops(saved):
    _, directory = saved("mixtral")
    spec = alloy.load(directory).spec
    dense = spec.replace(num_experts=0, experts_per_token=0)
    work = Workload(task="infer", batch_size=1, seq_len=8, new_tokens=4)
    moe_costs, dense_costs = model_costs(spec, work), model_costs(dense, work)
    h, f = spec.hidden_size, spec.intermediate_size
    expert = 3 * h * f
    # memory: 4 experts and a router per layer in place of one MLP
    assert moe_costs.layer_params[0] - dense_costs.layer_params[0] == pytest.approx(3 * expert + 4 * h)
    # FLOPs: 2 experts and the router per token
    extra = moe_costs.layer_decode_flops_per_sample[0] - dense_costs.layer_decode_flops_per_sample[0]
    assert extra == pytest.approx(2 * (expert + 4 * h))


# ---- `alloy generate` end to end ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["mixtral", "gemma3"])
def test_cli_generate_matches_transformers_greedy(name, tmp_path, capsys):
    hf = build_hf(name)
    hf.save_pretrained(tmp_path)
    tokenizer = char_tokenizer()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prompt = "Hello"
    ids = torch.tensor([tokenizer.encode(prompt).ids])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                               min_new_tokens=8, pad_token_id=0, eos_token_id=None)[0, ids.shape[1]:].tolist()
    code = main(["generate", "--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["tokens"] == expected


# ---- every config of the new families works or is refused in one line (as tests/test_bounds.py) --

def _new_family_property():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from alloy.errors import AlloyError
    from test_bounds import ANYTHING, NUMBERS, one_line_error, usable

    factors = st.one_of(ANYTHING, st.lists(NUMBERS, min_size=0, max_size=5))
    ropes = st.fixed_dictionaries(
        {"rope_type": st.sampled_from(["default", "yarn", "longrope", "llama3", "su", "dynamic"])},
        optional={**{k: NUMBERS for k in ("factor", "original_max_position_embeddings", "rope_theta",
                                          "attention_factor", "beta_fast", "beta_slow", "mscale",
                                          "mscale_all_dim", "low_freq_factor", "high_freq_factor")},
                  "truncate": ANYTHING, "short_factor": factors, "long_factor": factors})
    gemma3_ropes = st.fixed_dictionaries({}, optional={"full_attention": st.one_of(ropes, ANYTHING),
                                                       "sliding_attention": st.one_of(ropes, ANYTHING)})
    fields = ["num_experts", "num_local_experts", "num_experts_per_tok", "norm_topk_prob", "moe_intermediate_size",
              "mlp_only_layers", "decoder_sparse_step", "clip_qkv", "sliding_window_pattern", "rope_local_base_freq",
              "layer_types", "sliding_window", "head_dim", "num_hidden_layers", "original_max_position_embeddings",
              "use_sliding_window", "query_pre_attn_scalar"]
    new = ("llama-yarn", "qwen2-yarn-mscale", "phi3-longrope", "gemma3", "mixtral", "qwen3-moe", "olmo2", "olmoe")
    configs = {name: {"model_type": CASES[name][0], **CASES[name][1]} for name in new}

    @settings(max_examples=200, deadline=None)
    @given(name=st.sampled_from(sorted(configs)),
           changes=st.dictionaries(st.sampled_from(fields), st.one_of(ANYTHING, st.lists(NUMBERS, max_size=4)),
                                   max_size=2),
           rope=st.one_of(st.none(), ropes, gemma3_ropes))
    def check(name, changes, rope):
        config = configs[name] | changes | ({"rope_parameters": rope} if rope is not None else {})
        try:
            spec = ModelSpec.from_hf_config(config)
        except AlloyError as err:
            return one_line_error(err)
        try:
            usable(spec, lambda s: ModelSpec.from_hf_config(s.to_hf_config()))
        except Exception:
            print("failing config:", config)  # hypothesis does not show these arguments here
            raise

    return check


def test_any_new_family_config_gives_a_usable_spec_or_one_line():
    _new_family_property()()


@pytest.mark.parametrize("scalar", [256, 144, 1.1484375, 1.148438, 7.3e-3, 3.3e5])
def test_query_pre_attn_scalar_round_trips_exactly(scalar):
    # hypothesis found 1.148438 written back rounded to 6 places: a softmax scale 2e-7 off
    _, kwargs = CASES["gemma3"]
    spec = ModelSpec.from_hf_config({"model_type": "gemma3_text", **kwargs, "query_pre_attn_scalar": scalar})
    written = spec.to_hf_config()
    assert ModelSpec.from_hf_config(written) == spec
    assert written["query_pre_attn_scalar"] == scalar or isinstance(scalar, float)


def test_published_moe_sizes():
    """Mixtral 8x7B: 46.7B parameters; Qwen3-30B-A3B: 30.5B, about 3.3B active per token."""
    mixtral = ModelSpec.from_hf_config(dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768))
    assert abs(mixtral.num_params() / 46.70e9 - 1) < 0.01
    qwen = ModelSpec.from_hf_config(dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960))
    assert abs(qwen.num_params() / 30.53e9 - 1) < 0.01
    active = qwen.num_params() - 48 * (qwen.mlp_params(moe=True) - qwen.mlp_params(moe=True, active=True))
    assert abs(active / 3.3e9 - 1) < 0.05


def test_a_query_pre_attn_scalar_too_large_to_write_back_is_a_one_line_error():
    # hypothesis found it: 1.8e308 read, and its scale's inverse square overflowed on the way back
    config = {"model_type": CASES["gemma3"][0], **CASES["gemma3"][1], "query_pre_attn_scalar": 1.7976931348623157e308}
    with pytest.raises(ConfigError, match="query_pre_attn_scalar must be > 0 and at most 1e30") as err:
        ModelSpec.from_hf_config(config)
    assert "\n" not in str(err.value)
