"""Parity with transformers, litgpt style: tiny random HF models per family, fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

import alloy
from hf_cases import CASES, DECODERS, SOFTCAPPED, hf_output

TOLERANCE = 1e-4
VOCAB = 96
SEQ = 16  # longer than every sliding window in CASES (5), so windows matter

def _ids(batch=2, seq=SEQ):
    return torch.randint(0, VOCAB, (batch, seq))


def _alloy_out(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw)


@pytest.mark.parametrize("name", CASES)
def test_logits_match_transformers(name, saved):
    hf, directory = saved(name)
    model = alloy.load(directory)
    ids = _ids()
    expected = hf_output(hf, ids)
    got = _alloy_out(model, ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", CASES)
def test_save_round_trips_through_transformers(name, saved, tmp_path):
    import transformers

    hf, directory = saved(name)
    model = alloy.load(directory)
    out = alloy.save(model, tmp_path / "out")
    auto = transformers.AutoModel if not model.spec.causal else transformers.AutoModelForCausalLM
    reloaded = auto.from_pretrained(out, attn_implementation="eager").eval()
    ids = _ids()
    torch.testing.assert_close(hf_output(reloaded, ids), hf_output(hf, ids), atol=TOLERANCE, rtol=0)
    assert alloy.ModelSpec.from_hf_config(out / "config.json") == model.spec


@pytest.mark.parametrize("name", CASES)
def test_layer_slices_compose_to_the_whole_model(name, saved):
    _, directory = saved(name)
    whole = alloy.load(directory)
    stages = [alloy.load(directory, layers=(0, 1)), alloy.load(directory, layers=(1, 3), head=False),
              alloy.load(directory, layers=(3, 3))]  # the last stage holds only the final norm + head
    assert [(s.has_embed, s.has_head) for s in stages] == [(True, False), (False, False), (False, whole.spec.causal)]
    assert sum(p.numel() for s in stages for p in s.parameters()) >= whole.spec.num_params()
    ids = _ids()
    x = ids
    for stage in stages:
        x = _alloy_out(stage, x)
    torch.testing.assert_close(x, _alloy_out(whole, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", DECODERS)
def test_cached_decoding_equals_full_forward(name, saved):
    _, directory = saved(name)
    model = alloy.load(directory)
    ids = _ids()
    full = _alloy_out(model, ids)
    cache = model.new_cache(batch_size=2, max_len=SEQ)
    steps = [_alloy_out(model, ids[:, :6], cache=cache)]  # prefill
    for t in range(6, SEQ):
        steps.append(_alloy_out(model, ids[:, t : t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOLERANCE, rtol=0)
    assert cache.length == SEQ


@pytest.mark.parametrize("name", ["llama-gqa", "gemma2-softcap-sliding", "gpt2", "neox-parallel-partial", "bert"])
def test_padded_batch_matches_transformers(name, saved):
    hf, directory = saved(name)
    model = alloy.load(directory)
    ids = _ids(batch=3)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding: row 1 has 11 real tokens, row 2 has 7
    mask[2, 7:] = 0
    expected = hf_output(hf, ids, attention_mask=mask)
    got = _alloy_out(model, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=TOLERANCE, rtol=0)
    assert torch.isfinite(got).all()


def test_softcap_is_active_in_the_softcap_case(saved):
    """The Gemma 2 case must exercise the caps, or its parity would prove nothing about them."""
    (name,) = SOFTCAPPED
    _, directory = saved(name)
    model = alloy.load(directory)
    uncapped = alloy.Transformer(model.spec.replace(attn_softcap=0.0, final_softcap=0.0)).eval()
    uncapped.load_state_dict(model.state_dict())
    ids = _ids()
    assert (_alloy_out(model, ids) - _alloy_out(uncapped, ids)).abs().max() > 0.1


def test_token_type_ids_reach_the_encoder(saved):
    hf, directory = saved("bert")
    model = alloy.load(directory)
    ids = _ids()
    types = torch.randint(0, 2, ids.shape)
    expected = hf_output(hf, ids, token_type_ids=types)
    torch.testing.assert_close(_alloy_out(model, ids, token_type_ids=types), expected, atol=TOLERANCE, rtol=0)


def test_bf16_load_runs_close_to_fp32(saved):
    _, directory = saved("llama-gqa")
    fp32, bf16 = alloy.load(directory), alloy.load(directory, dtype="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    ids = _ids()
    diff = (_alloy_out(bf16, ids).float() - _alloy_out(fp32, ids)).abs().max()
    assert 0 < diff < 0.1  # bf16 has ~3 significant digits; logits here are O(1)
