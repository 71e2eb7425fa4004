"""Generation: greedy parity with transformers, batching, partitioning, int8, sampling, bad input."""

from __future__ import annotations


import pytest
import torch

import alloy
from alloy.errors import ConfigError
from alloy.infer import Sampling, generate
from alloy.infer.optimize import prepare
from alloy.infer.partition import Pipeline, even_split
from hf_cases import DECODERS

VOCAB = 96
NEW = 12

def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _greedy(model, prompts, new=NEW):
    return [g.tokens for g in generate(model, prompts, max_new_tokens=new, eos_ids=())]


@pytest.mark.parametrize("name", DECODERS)
def test_greedy_matches_transformers_generate(name, saved):
    hf, directory = saved(name)
    prompt = _prompts([7], seed=len(name))[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW,
                               min_new_tokens=NEW, pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
    model = alloy.load(directory)
    assert _greedy(model, [prompt]) == [expected]
    # the decode-optimised model (fused projections, k-major weights) generates the same tokens
    assert _greedy(prepare(model, "fp32"), [prompt]) == [expected]


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2-softcap-sliding", "gpt2"])
def test_batched_generation_equals_one_prompt_at_a_time(name, saved):
    _, directory = saved(name)
    model = alloy.load(directory)
    prompts = _prompts([3, 9, 1, 6], seed=1)  # left padding up to 8 slots; windows (5) are crossed
    assert _greedy(model, prompts, new=15) == [_greedy(model, [p], new=15)[0] for p in prompts]


def test_pipeline_in_one_process_equals_whole_model(saved):
    _, directory = saved("qwen2-bias-sliding")
    whole = alloy.load(directory)
    prompts = _prompts([4, 8, 5], seed=2)
    expected = _greedy(whole, prompts)
    for micro_batches in (1, 2, 3):  # 2 and 3 groups run the stages overlapped, on threads
        pipe = Pipeline.load(directory, even_split(3, ["cpu", "cpu", "cpu"]), micro_batches=micro_batches)
        assert [len(s.layers) for s in pipe.stages] == [1, 1, 1]
        assert _greedy(pipe, prompts) == expected


def test_pipeline_over_processes_equals_whole_model(saved):
    from alloy.infer.distributed import generate_distributed

    _, directory = saved("llama-gqa")
    prompts = _prompts([5, 2], seed=3)
    sampling = Sampling(temperature=0.9, top_k=20, seed=7)
    whole = alloy.load(directory)
    expected_greedy = _greedy(whole, prompts)
    expected_sampled = [g.tokens for g in generate(whole, prompts, max_new_tokens=NEW, sampling=sampling, eos_ids=())]
    got = generate_distributed(directory, even_split(3, ["cpu", "cpu"]), prompts, max_new_tokens=NEW, eos_ids=())
    assert got == expected_greedy
    got = generate_distributed(directory, even_split(3, ["cpu", "cpu"]), prompts, max_new_tokens=NEW,
                               sampling=sampling, eos_ids=())
    assert got == expected_sampled


def test_int8_logits_close_to_fp32(saved):
    # Per-channel int8 rounds each weight by at most half a step, s/2 with s = max|w_row| / 127; as
    # uniform noise its std is s / sqrt(12). For these Gaussian-like rows max|w| ~ 3 std(w) over
    # 32-48 inputs, so each matmul's output carries ~ 3 / 127 / sqrt(12) = 0.7% relative noise;
    # ~7 quantised matmuls per layer x 3 layers + head, adding in quadrature, give ~3.5%.
    # We assert a relative RMS error under 6% with fp32 activations (the weight error alone: both
    # Int8Linear and the CPU kernels' DecodeLinear that `prepare` uses) and under 8% for the bf16
    # activations of the fallback path (GPUs, CPUs without the kernels).
    _, directory = saved("llama-gqa")
    ids = torch.tensor(_prompts([16, 16], seed=4))
    with torch.no_grad():
        ref = alloy.load(directory)(ids)
        from alloy.infer.quantize import Int8Linear, quantize_int8

        q32 = quantize_int8(alloy.load(directory))
        assert sum(isinstance(m, Int8Linear) for m in q32.modules()) == 3 * 7 + 1
        got32 = q32(ids)
        got_prepared = prepare(alloy.load(directory), "int8")(ids)
        got16 = quantize_int8(alloy.load(directory).to(torch.bfloat16))(ids).float()
    rel = lambda a: float((a - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())  # noqa: E731
    assert 0 < rel(got32) < 0.06
    assert 0 < rel(got_prepared) < 0.06
    assert rel(got16) < 0.08


def test_sampling_is_seeded_and_filters_hold(saved):
    _, directory = saved("llama-gqa")
    model = alloy.load(directory)
    prompts = _prompts([6], seed=5)
    def run(**kw):
        return generate(model, prompts, max_new_tokens=NEW, sampling=Sampling(**kw), eos_ids=())[0].tokens

    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, top_k=1, seed=4) == _greedy(model, prompts)[0]  # top-1 is greedy
    assert run(temperature=1.0, top_p=1e-6, seed=5) == _greedy(model, prompts)[0]  # nucleus of one token
    from alloy.infer.sampling import Sampler

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = {int(Sampler(Sampling(temperature=1.0, top_k=2, seed=s))(logits)) for s in range(40)}
    assert draws == {0, 1}
    draws = {int(Sampler(Sampling(temperature=1.0, min_p=0.3, seed=s))(logits)) for s in range(40)}
    assert draws == {0, 1}  # p = .64, .24, .09, .03: min_p 0.3 keeps tokens >= 0.19
    penalised = Sampler(Sampling(repetition_penalty=3.0))(logits, seen=torch.tensor([[0]]))
    assert int(penalised) == 1  # 2.0 / 3 < 1.0


def test_eos_stops_a_row(saved):
    _, directory = saved("llama-gqa")
    model = alloy.load(directory)
    prompts = _prompts([5, 7], seed=6)
    free = _greedy(model, prompts)
    eos = free[0][3]
    out = generate(model, prompts, max_new_tokens=NEW, eos_ids=[eos])
    assert out[0].tokens == free[0][:free[0].index(eos) + 1] and out[0].finish_reason == "eos"
    if eos not in free[1]:
        assert out[1].tokens == free[1] and out[1].finish_reason == "length"


@pytest.mark.parametrize("bad, message", [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[list(range(60))]), "context"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompts=[[VOCAB + 3]]), "vocabulary"),
])
def test_bad_input_raises_typed_errors(bad, message, saved):
    _, directory = saved("llama-gqa")
    kwargs = dict(prompts=[[1, 2, 3]], max_new_tokens=8) | bad
    with pytest.raises(ConfigError, match=message):
        generate(alloy.load(directory), kwargs.pop("prompts"), **kwargs)


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(temperature=-1.0), dict(top_k=-2)])
def test_bad_sampling_settings_raise(kw):
    with pytest.raises(ConfigError):
        Sampling(**kw)


def test_bad_dtype_raises():
    with pytest.raises(ConfigError, match="dtype"):
        prepare(torch.nn.Linear(2, 2), "fp8")


def test_prepare_without_cpu_kernels_generates_the_same(saved, monkeypatch):
    # the path GPUs and compiler-less CPUs take: fused projections, PyTorch matmuls
    from alloy.infer import optimize

    monkeypatch.setattr(optimize, "uses_kernels", lambda model: False)
    _, directory = saved("llama-tied-bias")
    prompts = _prompts([5, 9], seed=7)
    expected = _greedy(alloy.load(directory), prompts)
    prepared = prepare(alloy.load(directory), "fp32")
    assert not any(isinstance(m, optimize.DecodeLinear) for m in prepared.modules())
    assert _greedy(prepared, prompts) == expected


@pytest.mark.parametrize("in_features", [12, 16])
def test_int8_linear_any_width(in_features):
    # torch's CPU int8 GEMV crashes the process for widths that are not a multiple of 8
    from alloy.infer.quantize import Int8Linear, int8_rows

    linear = torch.nn.Linear(in_features, 5, bias=True)
    x = torch.randn(3, in_features)
    q, scale = int8_rows(linear.weight)
    expected = x @ (q.float() * scale[:, None]).t() + linear.bias
    assert torch.allclose(Int8Linear(linear)(x), expected, atol=1e-5)
