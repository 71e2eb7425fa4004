"""The fused decode step (alloy/kernels/decode.c via alloy.infer.fused) against the model's own forward.

Same prepared model, same KV cache contents, same token: the one-call step must give the logits
PyTorch's ops give, for every weight storage and every block format, across the architectures it
takes (GQA, biases, sliding windows, per-head and whole q/k norms, partial rotary, Gemma's sandwich
norms, local RoPE tables and soft-capped logits), for one row and several; and it must decline what
it does not take, leaving the forward to run.
"""

from __future__ import annotations

import pytest
import torch
from hf_cases import build_hf

import alloy
from alloy.infer import generate
from alloy.infer.fused import KV_BF16_ISAS, FusedDecoder, NotFusable, fused_decoder
from alloy.infer.generate import ModelRunner
from alloy.infer.optimize import DecodeLinear, prepare
from alloy.kernels import quant as kernel_quant
from alloy.model import Transformer
from alloy.spec import ModelSpec

pytestmark = pytest.mark.skipif(kernel_quant.best_isa() is None, reason="no compiled kernels on this CPU")

# Widths that every block format takes (64 = 2 Q8_0/Q4 blocks); Q4_K's 256 needs its own size.
WIDE = dict(hidden_size=64, intermediate_size=128)
ARCHITECTURES = ["llama-gqa", "llama-tied-bias", "qwen2-bias-sliding", "qwen3-qknorm", "phi3-fused-partial",
                 "gemma3", "olmo2", "mistral-sliding"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def get(name, **changes):
        key = (name, tuple(sorted(changes.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(name)
            build_hf(name, **changes).save_pretrained(directory)
            cache[key] = directory
        return cache[key]

    return get


def _step_gaps(model, rows: int, steps: int = 6, prompt: int = 7, fused=None) -> tuple[float, float]:
    """Prefill `rows` prompts with the forward into two caches, then decode `steps` tokens with the
    forward on one and the fused step on the other: the largest relative logit difference, and the
    largest relative difference of the keys and values the two wrote into their caches."""
    fused = fused or FusedDecoder.build(model)
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(1, model.spec.vocab_size, (rows, prompt), generator=g)
    own, mine = model.new_cache(rows, prompt + steps), model.new_cache(rows, prompt + steps)
    worst = 0.0
    with torch.inference_mode():
        model(ids, cache=own)
        model(ids, cache=mine)
        token = torch.randint(1, model.spec.vocab_size, (rows, 1), generator=g)
        for _ in range(steps):
            assert fused.accepts(token, None, None, mine)
            want, got = model(token, cache=own), fused(token, mine)
            assert got.shape == want.shape and mine.length == own.length
            worst = max(worst, float((want - got).abs().max() / want.abs().max()))
            token = want[:, -1].argmax(-1, keepdim=True)
    cache = max(float((a - b).abs().max() / a.abs().max()) for i in own.k
                for a, b in ((own.k[i], mine.k[i]), (own.v[i], mine.v[i])))
    return worst, cache


def _steps_agree(model, rows: int, steps: int = 6, prompt: int = 7, rtol: float = 1e-4, fused=None) -> float:
    """`_step_gaps`' logit difference; the caches must agree to `rtol`."""
    worst, cache = _step_gaps(model, rows, steps, prompt, fused)
    assert cache <= rtol, f"the caches differ by {cache:.3g} relative"
    return worst


# fp32 arithmetic on the same weights in both paths; they differ in summation order (attention, the
# norms) and in exp/tanh's last bits: 1e-7 relative seen, 1e-4 allowed (depth, cancellation).
# The block formats round each activation to 8 bits per 32 before their integer dots (both paths
# do), so a few-ulp difference upstream can flip one rounding: that product moves by a quantization
# step, max|x| / 127 |w|, ~1 % of an output (seen on Phi-3 in Q8_0), and the flip's error rides
# along in the KV cache into later steps. Whether and where a flip happens depends on the last bits
# PyTorch's kernels leave, which differ by CPU; so past 2e-2 the bound is measured on the model
# itself: how far its own forward moves when every quantized layer's input is nudged by a few ulp
# (`_rounding_sensitivity`, which flips the roundings that sit near a boundary), times NUDGE_MARGIN.
# What the fused step adds is the same for every weight kind (the C between the GEMVs), and the
# fp32 kinds check it tightly; the block formats' own GEMVs are checked against float64 in
# test_quant_kernels. bf16 rounds each linear's input to bf16 (gemv.c): a flip there moves one
# product by a bf16 ulp (2^-8), smaller, but past 1e-4 all the same; it takes the same measured bound.
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-4, "int8": 1e-4, "q8_0": 2e-2, "q4_0": 2e-2, "q4_1": 2e-2, "q4_k": 2e-2}
ROUNDED_INPUTS = {"bf16", "q8_0", "q4_0", "q4_1", "q4_k"}
NUDGE_ULPS, NUDGE_MARGIN = (1, -1, 2, -2, 4, -4, 8, -8, 16, -16, 32, -32), 1.5


def _rounding_sensitivity(model, rows: int, steps: int = 6, prompt: int = 7) -> float:
    """The largest relative logit change over `steps` forward decode steps (as `_steps_agree` runs
    them) when every QuantLinear's (and bf16 DecodeLinear's) input is scaled by 1 + u ulp, over u in
    NUDGE_ULPS: how far this model's outputs move when upstream last bits flip some of the
    activations' roundings."""
    from alloy.quant.linear import QuantLinear

    factor = [None]

    def nudge(_module, args):
        return None if factor[0] is None else (args[0] * factor[0],)

    def run(cache, ids, scale):
        factor[0] = scale
        try:
            return model(ids, cache=cache)
        finally:
            factor[0] = None

    rounding = [m for m in model.modules()
                if isinstance(m, QuantLinear) or (isinstance(m, DecodeLinear) and m.storage == "bf16")]
    hooks = [m.register_forward_pre_hook(nudge) for m in rounding]
    worst = 0.0
    try:
        for ulps in NUDGE_ULPS:
            scale = 1 + ulps * torch.finfo(torch.float32).eps
            g = torch.Generator().manual_seed(rows)
            ids = torch.randint(1, model.spec.vocab_size, (rows, prompt), generator=g)
            plain, moved = model.new_cache(rows, prompt + steps), model.new_cache(rows, prompt + steps)
            with torch.inference_mode():
                run(plain, ids, None), run(moved, ids, scale)
                token = torch.randint(1, model.spec.vocab_size, (rows, 1), generator=g)
                for _ in range(steps):
                    want, got = run(plain, token, None), run(moved, token, scale)
                    worst = max(worst, float((want - got).abs().max() / want.abs().max()))
                    token = want[:, -1].argmax(-1, keepdim=True)
    finally:
        for hook in hooks:
            hook.remove()
    return worst


def _assert_steps_agree(model, storage: str, rows: int) -> None:
    """The fused step within TOLERANCE of the forward; for a kind that rounds its inputs past it,
    within NUDGE_MARGIN of what a few ulp of input move this model's own forward."""
    worst, cache = _step_gaps(model, rows)
    bound, why = TOLERANCE[storage], ""
    if storage in ROUNDED_INPUTS and max(worst, cache) >= bound:
        sensitivity = _rounding_sensitivity(model, rows)
        bound, why = max(bound, NUDGE_MARGIN * sensitivity), f" (nudging the forward's inputs moved it {sensitivity:.4f})"
    assert worst < bound and cache <= bound, f"logits {worst:.4f}, caches {cache:.4f} relative{why}"


@pytest.mark.parametrize("name", ARCHITECTURES)
@pytest.mark.parametrize("storage", ["fp32", "bf16", "int8", "q8_0", "q4_0", "q4_1"])
def test_fused_step_equals_the_forward(name, storage, built):
    model = prepare(alloy.load(built(name, **WIDE)), storage)
    for rows in (1, 3):
        _assert_steps_agree(model, storage, rows)


def test_fused_step_on_q4_k():
    spec = ModelSpec(family="llama", vocab_size=300, hidden_size=256, num_layers=2, num_heads=4,
                           num_kv_heads=2, head_dim=64, intermediate_size=512, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = prepare(model, "q4_k")
    _assert_steps_agree(model, "q4_k", rows=1)


@pytest.mark.parametrize("storage", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding", "gemma3"])
def test_slot_cache_rows_at_their_own_positions_equal_the_forward(name, storage, built):
    """Serving's continuous batching: each row of a slot cache at its own length (one request long
    in, one just prefilled, one idle at 0 riding along); the fused step writes each row's keys at its
    own slot and attends over its own slots, as the forward does. Sliding windows and Gemma's local
    RoPE table make the per-row span and tables matter. bf16: the cache in bf16 where the fused step
    reads one (the AVX-512 builds), the forward writing it through PyTorch's rounding, the step
    through its own."""
    model = prepare(alloy.load(built(name, **WIDE)), storage)
    fused = FusedDecoder.build(model)
    bf16_cache = storage == "bf16" and fused.isa in KV_BF16_ISAS
    bound = 1e-4 if storage == "fp32" else max(1e-4, NUDGE_MARGIN * _rounding_sensitivity(model, 3))
    g = torch.Generator().manual_seed(0)
    own, mine = model.new_cache(3, 40, slots=True), model.new_cache(3, 40, slots=True)
    with torch.inference_mode():
        for cache in (own, mine):
            for row, prompt in ((0, 23), (1, 4)):
                ids = torch.randint(1, model.spec.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(row))
                model(ids, cache=cache.rows(row, row + 1))
        token = torch.randint(1, model.spec.vocab_size, (3, 1), generator=g)
        for _ in range(5):
            assert fused.accepts(token, None, None, mine)
            want, got = model(token, cache=own), fused(token, mine)
            assert torch.equal(own.lengths, mine.lengths) and own.lengths.tolist() == mine.lengths.tolist()
            assert float((want - got).abs().max() / want.abs().max()) < bound
            token = want[:, -1].argmax(-1, keepdim=True)
        for i in own.k:
            assert own.k[i].dtype == (torch.bfloat16 if bf16_cache else torch.float32)
            for a, b in ((own.k[i], mine.k[i]), (own.v[i], mine.v[i])):
                assert float((a.float() - b.float()).abs().max()) <= bound * float(a.float().abs().max())
    assert own.lengths.tolist() == [28, 9, 5]


@pytest.mark.parametrize("storage, reduced", [("bf16", True), ("q8_0", True), ("q4_0", True),
                                               ("fp32", False), ("int8", False)])
def test_a_bf16_cache_only_where_the_fused_step_reads_it(storage, reduced, built, monkeypatch):
    # bf16 and the block formats, with the fused step on an AVX-512 build: bf16 keys and values (as
    # llama.cpp keeps f16 ones); fp32 and int8 weights keep fp32 arithmetic there; without the fused
    # step (its forward would widen the cache every step) fp32
    model = prepare(alloy.load(built("llama-gqa", **WIDE)), storage)
    fused = FusedDecoder.build(model)
    want = torch.bfloat16 if reduced and fused.isa in KV_BF16_ISAS else torch.float32
    assert model.new_cache(2, 8).k[0].dtype == want and model.new_cache(2, 8, slots=True).v[0].dtype == want
    monkeypatch.setattr(kernel_quant, "best_isa", lambda: None)  # no fused step
    unfused = prepare(alloy.load(built("llama-gqa", **WIDE)), storage)
    assert unfused.new_cache(2, 8).k[0].dtype == torch.float32


def test_each_new_cache_is_bound_afresh(built):
    # one decoder, many generations: each makes a cache (a freed one's id may come back for the next)
    model = prepare(alloy.load(built("llama-gqa", **WIDE)), "fp32")
    fused = FusedDecoder.build(model)
    for rows in (1, 2, 2, 1, 3):
        assert _steps_agree(model, rows, fused=fused) < 1e-4
    # a longer cache than any before: the table of every slot's RoPE rows grows with it
    assert _steps_agree(model, 2, prompt=40, fused=fused) < 1e-4
    assert fused._rope_table.shape[0] == 46


def test_generation_takes_the_fused_step_and_gives_the_forwards_tokens(built, monkeypatch):
    # fp32 weights: the two paths' logits agree to ~1e-7, far inside this model's top-2 margins
    model = prepare(alloy.load(built("llama-gqa", **WIDE)), "fp32")
    calls = []
    original = FusedDecoder.__call__

    def counting(self, ids, cache):
        calls.append(tuple(ids.shape))
        return original(self, ids, cache)

    monkeypatch.setattr(FusedDecoder, "__call__", counting)
    prompts = [[5, 9, 2, 7], [1, 3, 3, 8]]
    got = [g.tokens for g in generate(model, prompts, max_new_tokens=12, eos_ids=())]
    assert calls == [(2, 1)] * 11  # every decode step after the prefill
    plain = ModelRunner(model)
    plain.fused = None
    assert [g.tokens for g in generate(plain, prompts, max_new_tokens=12, eos_ids=())] == got


def test_what_the_fused_step_declines(built):
    model = prepare(alloy.load(built("llama-gqa", **WIDE)), "q8_0")
    fused = FusedDecoder.build(model)
    cache = model.new_cache(2, 16)
    token = torch.ones(2, 1, dtype=torch.long)
    assert fused.accepts(token, None, None, cache)
    assert not fused.accepts(torch.ones(2, 3, dtype=torch.long), None, None, cache)  # a prefill
    assert not fused.accepts(token, None, torch.ones(2, 1), cache)  # padded rows
    assert not fused.accepts(token, torch.zeros(2, 1, dtype=torch.long), None, cache)  # own positions
    slots = model.new_cache(2, 16, slots=True)
    assert fused.accepts(token, None, None, slots)  # a serving slot cache: rows at their own positions
    slots.lengths[1] = 16
    assert not fused.accepts(token, None, None, slots)  # one full row: the forward says so
    assert not fused.accepts(torch.ones(3, 1, dtype=torch.long), None, None, cache)  # rows the cache lacks
    cache.length = 16
    assert not fused.accepts(token, None, None, cache)  # a full cache: the forward says so
    # whole models it does not take: their own forward decodes
    assert fused_decoder(alloy.load(built("llama-gqa", **WIDE))) is None  # not prepared
    for name in ("mixtral", "gpt2", "gemma2-softcap-sliding", "neox-parallel-partial"):
        with pytest.raises(NotFusable):
            FusedDecoder.build(prepare(alloy.load(built(name)), "fp32"))
