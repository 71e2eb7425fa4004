"""QuantLinear (alloy.quant.linear) on every kernel variant this CPU runs, and the PyTorch
fallback, against a float64 matmul on the same dequantized weights; then whole models.

Tolerances are derived, not measured. The integer-dot path rounds the activation to int8 per
32 inputs with scale d = max|x| / 127, so |x - x̂| <= d / 2 per input and the output moves by at
most sum over blocks of d / 2 * sum|w| in that block; on top comes fp32 rounding, a few units of
2^-24 per accumulated term of the largest magnitude involved. The GEMM and fallback paths have
only the fp32 term (the weights are dequantized exactly). The integer path is also held to the
fp32 term alone against a reference whose activation is rounded exactly as quant.c rounds it:
that catches a wrong offset or min term that the looser bound would let through.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

import alloy
from alloy import quant
from alloy.errors import ConfigError
from alloy.infer import generate
from alloy.infer.optimize import decode_dtype, prepare
from alloy.kernels import quant as kernel_quant
from alloy.quant.linear import GEMV_MAX_ROWS, QuantEmbedding, QuantLinear, kernel_rows

PATHS = [*kernel_quant.distinct_isas(), None]  # None: the PyTorch fallback
EPS32 = 2.0**-24


def _tolerance(x: torch.Tensor, w: torch.Tensor, integer_dots: bool) -> torch.Tensor:
    """Per-output bound [rows, out] on |kernel - float64 reference| (see the module docstring)."""
    x, w = x.double(), w.double()
    k = x.shape[1]
    # fp32: every accumulated term is below 4 max|w_row| |x_i| (the Q4 offsets and mins are
    # accumulated apart from the nibble dots, each bounded by 2-3 max|w_row|), k + 8 roundings deep
    magnitude = x.abs().sum(1, keepdim=True) * (4 * w.abs().amax(1))[None, :]
    fp32 = (k + 8) * EPS32 * magnitude + 1e-30
    if not integer_dots:
        return fp32
    half_step = (x.abs().view(x.shape[0], -1, 32).amax(2) / 127 / 2) * (1 + 1e-4)  # [rows, blocks]
    w_block_abs = w.abs().view(w.shape[0], -1, 32).sum(2)  # [out, blocks]
    return half_step @ w_block_abs.t() + fp32


def _act_rounded(x: torch.Tensor) -> torch.Tensor:
    """x as quant.c rounds it, in float64: per 32 inputs d = max|x| / 127 (fp32), q = round-half-even(x / d)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(2, keepdim=True) / 127
    inverse = torch.where(d > 0, torch.ones_like(d) / d, torch.zeros_like(d))
    return (torch.round(blocks * inverse).double() * d.double()).view(x.shape)


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(list(quant.FORMATS)), path=st.sampled_from(PATHS),
       rows=st.sampled_from([1, 2, 3, 5, 8, 13, 31, 32, 33, 40]), out=st.integers(1, 37), blocks=st.integers(1, 3),
       with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_quant_linear_equals_float64_on_dequantized_weights(fmt, path, rows, out, blocks, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    k = quant.FORMATS[fmt].block_size * blocks
    w = torch.randn(out, k, generator=g)
    x = torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 4
    bias = torch.randn(out, generator=g) if with_bias else None
    layer = QuantLinear.from_weight(w, bias, fmt, isa=path)
    w_exact = quant.dequantize(layer.gguf_blocks(), fmt)  # GGUF order, whatever layout the kernel reads
    # the C dequantizer gives ggml's floats too, bit for bit (signed zeros included)
    assert torch.equal(layer.dequantized().view(torch.int32), w_exact.view(torch.int32))
    want = x.double() @ w_exact.double().t() + (0 if bias is None else bias.double())
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, out)
    integer_dots = path is not None and rows <= kernel_rows(path, fmt)
    assert ((got.double() - want).abs() <= _tolerance(x, w_exact, integer_dots)).all()
    if integer_dots:  # and tightly, with the activation rounded the kernel's way: fp32 error only
        x_int8 = _act_rounded(x)
        want = x_int8 @ w_exact.double().t() + (0 if bias is None else bias.double())
        assert ((got.double() - want).abs() <= _tolerance(x, w_exact, integer_dots=False)).all()


@pytest.mark.parametrize("crossover", ["32", "inf"])  # prefill rows by dequantize + GEMM, or by the kernel
@pytest.mark.parametrize("out", [517, 512])  # 512: the interleaved layouts where the ISA has them
@pytest.mark.parametrize("path", PATHS)
def test_large_layer_every_path(path, out, crossover, monkeypatch):
    # 2 threads over the output rows, k = 1024: the block loops at a real size, GEMV and GEMM tiles
    monkeypatch.setenv("ALLOY_QUANT_KERNEL_ROWS", crossover)
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(out, 1024, generator=g), torch.randn(40, 1024, generator=g)
    for fmt in quant.FORMATS:
        layer = QuantLinear.from_weight(w, None, fmt, isa=path)
        interleaved = kernel_quant.INTERLEAVED.get(fmt)
        assert layer.kernel_fmt == (interleaved[0] if interleaved and path in interleaved[1] and out % 8 == 0 else fmt)
        w_exact = layer.dequantized()
        for rows in (1, 5, 40):
            want = x[:rows].double() @ w_exact.double().t()
            err = (layer(x[:rows]).double() - want).abs()
            assert (err <= _tolerance(x[:rows], w_exact, path is not None and rows <= float(crossover))).all(), fmt


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(sorted(kernel_quant.INTERLEAVED)), groups=st.integers(1, 5), blocks=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_interleaved_layouts_hold_the_gguf_bytes(fmt, groups, blocks, seed):
    # the kernels' interleaved copy of a weight is the same size and gives back GGUF's bytes exactly
    name, _, rows = kernel_quant.INTERLEAVED[fmt]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(groups * rows, quant.FORMATS[fmt].block_size * blocks, generator=g) * 3
    raw = quant.quantize(w, fmt)
    repack, unpack = kernel_quant.REPACK[name]
    packed = repack(raw)
    assert packed.shape == raw.shape and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed), raw)
    assert torch.equal(unpack(packed[rows:]), raw[rows:])  # whole groups unpack on their own (prefill tiles)


def _tiny_llama(hidden: int, ffn: int, heads: int, tied: bool = False) -> alloy.Transformer:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                                      num_key_value_heads=heads // 2, intermediate_size=ffn, vocab_size=96,
                                      max_position_embeddings=64, tie_word_embeddings=tied)
    model = alloy.Transformer(alloy.ModelSpec.from_hf_config(config.to_dict())).eval()
    with torch.no_grad():  # logits far apart: greedy tokens do not hinge on near-ties
        (model.embed.tok.weight if tied else model.head.weight).mul_(30)
    return model


class _Float64Twin(torch.nn.Module):
    """x @ W.T + b in float64 with W the floats the blocks encode and, where QuantLinear takes the
    integer-dot path (up to `act_rows` rows: ALLOY_QUANT_KERNEL_ROWS as the test sets it), x
    rounded to int8 per 32 inputs as quant.c does (scale max|x| / 127, round half to even): the
    kernels' arithmetic without their fp32 sums."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_rows: float):
        super().__init__()
        self.weight = weight.detach().double()
        self.bias = None if bias is None else bias.detach().double()
        self.act_rows = act_rows

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        xd = x.double()
        if rows <= self.act_rows:
            xd = _act_rounded(x.reshape(rows, -1)).view(x.shape)
        y = xd @ self.weight.t() + (0 if self.bias is None else self.bias)
        return y.to(x.dtype)


def _rounded(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    return quant.dequantize(quant.quantize(weight, fmt), fmt)


def _twin(model: alloy.Transformer, fmt: str, act_rows: float = GEMV_MAX_ROWS) -> alloy.Transformer:
    """The model with every linear a _Float64Twin and the token table rounded through Q8_0, a
    tied head reading that rounded table (as prepare() keeps the head and the table)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        table = twin.embed.tok.weight
        table.copy_(_rounded(table, "q8_0"))
    for parent_name, parent in list(twin.named_modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear:
                full = f"{parent_name}.{name}" if parent_name else name
                weight = _rounded(child.weight, "q8_0" if full == "head" else fmt)
                setattr(parent, name, _Float64Twin(weight, child.bias, act_rows))
    if not hasattr(twin, "head"):
        twin.head = _Float64Twin(twin.embed.tok.weight, None, act_rows)
    return twin


@pytest.mark.parametrize("fmt, hidden, ffn, heads, tied", [("q8_0", 64, 128, 4, False), ("q4_0", 64, 96, 4, False),
                                                           ("q4_1", 64, 96, 4, True), ("q4_k", 256, 256, 4, False)])
@pytest.mark.parametrize("crossover", [32, float("inf")])
def test_quantized_model_generates_like_its_float64_twin(fmt, hidden, ffn, heads, tied, crossover, monkeypatch):
    # Prefill (2 x 20 rows: dequantize + GEMM, or the integer kernels where they take every row
    # count) and 32 decode steps of 2 rows (the integer kernels).
    monkeypatch.setenv("ALLOY_QUANT_KERNEL_ROWS", str(crossover))
    model = _tiny_llama(hidden, ffn, heads, tied)
    prepared = prepare(copy.deepcopy(model), fmt)
    assert isinstance(prepared.head, QuantLinear) and prepared.head.fmt == "q8_0"
    assert isinstance(prepared.embed.tok, QuantEmbedding)
    if tied:  # one copy of the table, read by the lookup and the head
        assert prepared.head.blocks.data_ptr() == prepared.embed.tok.blocks.data_ptr()
    assert not any(type(m) is torch.nn.Linear for m in prepared.modules())
    prompts = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(3)).tolist()
    # without kernels (ALLOY_CPU_KERNELS=0) every path is the exact-activation fallback
    twin = _twin(model, fmt, act_rows=crossover if kernel_quant.best_isa() is not None else 0)
    # the weights' arithmetic alone: keys and values in fp32 in both (the bf16 cache the fused step
    # keeps, rounded from fp32 here and from float64 in the twin, would flip roundings of its own;
    # tests/test_fused_decode.py checks it against the forward on the same cache)
    prepared.kv_cache_dtype = None
    want = [g.tokens for g in generate(twin, prompts, max_new_tokens=32, eos_ids=())]
    assert [g.tokens for g in generate(prepared, prompts, max_new_tokens=32, eos_ids=())] == want
    # Against the plain dequantized fp32 model (no activation rounding) the logits move by the
    # activation's 8-bit rounding only: well under 2 % of their range on this model.
    ids = torch.tensor([prompts[0] + want[0]])
    with torch.no_grad():
        plain = _twin(model, fmt, act_rows=0)
        steps = [prepared(ids[:, : t + 1])[0, -1] - plain(ids[:, : t + 1])[0, -1] for t in range(19, 25)]
        spread = float(plain(ids)[0].max() - plain(ids)[0].min())
    assert max(float(s.abs().max()) for s in steps) < 0.02 * spread


def test_fallback_without_kernels_generates_the_same(monkeypatch):
    monkeypatch.setenv("ALLOY_QUANT_KERNEL_ROWS", "32")
    model = _tiny_llama(64, 128, 4)
    prompts = [[5, 6, 7, 8]]
    with_kernels = prepare(copy.deepcopy(model), "q8_0")
    kernels_ran = kernel_quant.best_isa() is not None
    monkeypatch.setenv("ALLOY_CPU_KERNELS", "0")
    without = prepare(copy.deepcopy(model), "q8_0")
    assert {m.isa for m in without.modules() if isinstance(m, QuantLinear)} == {None}
    # without kernels every row count takes the exact GEMM path: the twin without activation rounding
    want = generate(_twin(model, "q8_0", act_rows=0), prompts, max_new_tokens=16, eos_ids=())[0].tokens
    assert generate(without, prompts, max_new_tokens=16, eos_ids=())[0].tokens == want
    want = generate(_twin(model, "q8_0", act_rows=GEMV_MAX_ROWS if kernels_ran else 0), prompts, max_new_tokens=16,
                    eos_ids=())[0].tokens
    assert generate(with_kernels, prompts, max_new_tokens=16, eos_ids=())[0].tokens == want


def test_bad_dtype_and_widths_raise_config_errors():
    with pytest.raises(ConfigError, match="unknown dtype 'q5_k'"):
        decode_dtype("q5_k")
    model = _tiny_llama(64, 128, 4)
    with pytest.raises(ConfigError, match="64 inputs, not a multiple of q4_k's block of 256"):
        prepare(model, "q4_k")
    # nothing was quantized before the width check failed
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(ConfigError, match="must be uint8"):
        QuantLinear(torch.zeros(3, 10, dtype=torch.uint8), "q8_0", 32)


def test_cli_generate_with_a_block_format(tmp_path, capsys):
    import json

    from alloy.cli import main
    from hf_cases import char_tokenizer

    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    argv = ["generate", "--model", str(tmp_path), "--prompt", "Hello", "--max-new-tokens", "8", "--json"]
    model = prepare(alloy.load(tmp_path), "q8_0")
    want = generate(model, [[ord(c) - 32 for c in "Hello"]], max_new_tokens=8, eos_ids=())[0].tokens
    assert main([*argv, "--dtype", "q8_0"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["dtype"] == "q8_0" and record["tokens"] == want
    assert main([*argv, "--dtype", "q4_0"]) == 0 and len(json.loads(capsys.readouterr().out)["tokens"]) == 8
    # bad input: a clean exit 2 with one line naming the problem
    assert main([*argv, "--dtype", "q4_k"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a multiple of q4_k's block of 256" in err and "\n" not in err
    assert main([*argv, "--dtype", "q3_k"]) == 2 and "unknown dtype 'q3_k'" in capsys.readouterr().err


@pytest.mark.skipif(kernel_quant.best_isa() is None, reason="no compiled kernels on this CPU")
def test_the_prefill_crossover_is_measured_once_per_machine_and_every_process_reads_it(tmp_path, monkeypatch):
    """Past GEMV_MAX_ROWS, the kernel or dequantize + GEMM by what this machine measured: the limit
    follows from the recorded timings, sits in the cache, and a second process reads it unchanged
    (the ranks of a job must agree: the two paths round differently)."""
    import json
    import subprocess
    import sys

    from alloy.quant import linear

    monkeypatch.setenv("ALLOY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ALLOY_QUANT_KERNEL_ROWS", raising=False)
    linear._measured_kernel_rows.cache_clear()
    isa = kernel_quant.best_isa()
    layer = QuantLinear.from_weight(torch.randn(64, 1024, generator=torch.Generator().manual_seed(0)), None, "q4_0",
                                    isa=isa)
    limit = kernel_rows(isa, layer.fmt)
    (record_path,) = tmp_path.glob("kernels/quant-rows-*.json")
    record = json.loads(record_path.read_text())
    assert record["kernel_rows"] == limit >= GEMV_MAX_ROWS
    timings = {int(rows): t for rows, t in record["timings"].items()}
    assert set(timings) <= set(linear.CROSSOVER_ROWS) and timings
    for rows, t in timings.items():  # the kernel takes a row count exactly where it measured faster
        assert (limit >= rows) == (t["kernel_s"] <= t["gemm_s"]), (rows, t, limit)
    # a later process reads the same answer without measuring again
    stamp = record_path.stat().st_mtime_ns
    code = ("import torch; from alloy.quant.linear import kernel_rows; "
            f"torch.set_num_threads({torch.get_num_threads()}); print(kernel_rows({isa!r}, {layer.fmt!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**__import__("os").environ, "ALLOY_CACHE_DIR": str(tmp_path)}).stdout
    assert float(out) == limit and record_path.stat().st_mtime_ns == stamp
    # and the layer takes 40 rows the way the limit says
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(1))
    by_kernel = kernel_quant.gemv(x, layer.blocks, layer.kernel_fmt, 64, None, isa)
    assert torch.equal(layer(x), by_kernel if limit >= 40 else layer.matmul(x))


def test_a_bad_crossover_setting_is_a_config_error(monkeypatch):
    monkeypatch.setenv("ALLOY_QUANT_KERNEL_ROWS", "many")
    with pytest.raises(ConfigError, match="ALLOY_QUANT_KERNEL_ROWS='many'"):
        kernel_rows("avx2", "q4_0")


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k"])
def test_blocks_off_the_host_hold_ggufs_layout_and_decode_in_pytorch(fmt, monkeypatch):
    # The compiled kernels read host memory: a layer whose blocks move to a GPU drops them and their
    # interleaved layout. "Off the host" is simulated on CPU tensors here (on_host patched), so the
    # unpacking and the fallback it switches to are checked on every machine; the real move is
    # test_block_formats_on_cuda_equal_the_cpu_fallback (gpu).
    from alloy.quant import linear

    g = torch.Generator().manual_seed(0)
    layer = QuantLinear.from_weight(torch.randn(16, 256, generator=g) * 0.05, torch.randn(16, generator=g), fmt)
    table = QuantEmbedding(layer.blocks, fmt, 256, layout=layer.kernel_fmt)  # a tied head's lookup
    gguf, weight = layer.gguf_blocks().clone(), layer.dequantized().double()
    x, ids = torch.randn(3, 256, generator=g), torch.tensor([[0, 9], [15, 4]])
    monkeypatch.setattr(linear, "on_host", lambda blocks: False)
    layer.to("cpu"), table.to("cpu")  # what .to("cuda") runs after moving the tensors
    monkeypatch.undo()
    assert layer.isa is None and layer.kernel_fmt == fmt and layer.group_rows == 1
    assert torch.equal(layer.blocks, gguf) and torch.equal(table.blocks, gguf) and table.layout == fmt
    want = x.double() @ weight.t() + layer.bias.double()
    assert ((layer(x).double() - want).abs() <= _tolerance(x, weight, False)).all()
    assert torch.equal(table(ids).double(), weight[ids])


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k"])
def test_block_formats_on_cuda_equal_the_cpu_fallback(fmt, monkeypatch):
    # The same blocks on the GPU, decoded by PyTorch there: fp32 arithmetic on the same weights as
    # the CPU's fallback, so logits agree to fp32 rounding and greedy tokens are equal (this model's
    # logits are far apart). Both routes: prepared on the GPU, and prepared on the CPU then moved.
    from alloy.infer.fused import fused_decoder

    model = _tiny_llama(256, 256, 4, tied=fmt == "q4_0")
    prompts = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(3)).tolist()
    on_gpu = prepare(copy.deepcopy(model).cuda(), fmt)
    moved = prepare(copy.deepcopy(model), fmt).cuda()
    monkeypatch.setenv("ALLOY_CPU_KERNELS", "0")
    cpu = prepare(copy.deepcopy(model), fmt)
    layers = [m for gpu in (on_gpu, moved) for m in gpu.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.blocks.is_cuda and m.isa is None and m.kernel_fmt == m.fmt for m in layers)
    assert fused_decoder(on_gpu) is None and fused_decoder(moved) is None
    # the bf16 cache is the CPU's fused step's: a moved model's cache is in its parameters' dtype
    assert all(next(iter(m.new_cache(1, 4).k.values())).dtype == torch.float32 for m in (on_gpu, moved))
    ids = torch.tensor(prompts)
    with torch.no_grad():
        want = cpu(ids)
        for gpu in (on_gpu, moved):
            got = gpu(ids.cuda()).cpu()
            assert float((got - want).abs().max()) < 1e-4 * float(want.abs().max())
    tokens = [g.tokens for g in generate(cpu, prompts, max_new_tokens=16, eos_ids=())]
    for gpu in (on_gpu, moved):
        assert [g.tokens for g in generate(gpu, prompts, max_new_tokens=16, eos_ids=())] == tokens
