"""Loading a model as GGUF blocks (alloy.infer.load) builds it layer by layer and each weight a
chunk of rows at a time, read from the file as quantized: the whole checkpoint is never in memory,
in its own dtype or in fp32, beside the blocks, nor is a layer, nor a whole weight.

Measured in a fresh process on a ~98M Llama saved in bf16 (h768, 12 layers, vocab 8192): the
process's peak RSS over its resident size before the load (after warming every code path on a
tiny model, so that libraries and kernels count as the interpreter) against the bytes of the
loaded model's tensors (58 MiB). Loading whole then quantizing peaked at 6.7x the blocks (the
bf16 checkpoint, 196 MB, plus its fp32 conversions); a layer at a time from float layers, at
1.53-2.10x (one layer as read, its safetensors pages while the file was mapped, its fused q/k/v
and gate/up copies and the quantizer's temporaries on top); a chunk at a time, 1.08-1.13x over 10
runs (Xeon AVX-512, 2 cores): one chunk's float rows (256K weights) and the quantizer's
temporaries, 5-8 MiB. The bound is the issue's target, 1.3x.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from alloy.checkpoint import save
from alloy.model import Transformer
from alloy.model.init import init_params
from alloy.quant.linear import QuantLinear
from alloy.spec import ModelSpec

PROBE = r"""
import gc, json, sys
import torch
from alloy.infer.load import load_for_decoding
from alloy.runtime.build import release_free_heap

def peak():  # VmHWM, not ru_maxrss: Linux carries the parent's high-water mark across fork + exec
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
def resident():
    with open("/proc/self/statm") as f: return int(f.read().split()[1]) * 4096

tiny, big = sys.argv[1], sys.argv[2]
warm = load_for_decoding(tiny, "q4_0"); del warm; gc.collect(); release_free_heap()
before = resident()
model = load_for_decoding(big, "q4_0")
tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
size = sum(t.numel() * t.element_size() for t in tensors)
with torch.no_grad():
    logits = model(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1, :8].tolist()
print(json.dumps({"added": peak() - before, "size": size, "logits": logits}))
"""


def _saved(path, hidden, layers, vocab):
    spec = ModelSpec(family="llama", vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=hidden // 64,
                     num_kv_heads=hidden // 64, head_dim=64, intermediate_size=int(hidden * 8 / 3) // 32 * 32,
                     max_seq_len=256, tie_embeddings=False)
    save(init_params(Transformer(spec), 0).to(torch.bfloat16), path)
    return spec


def test_loading_as_q4_0_builds_layer_by_layer_and_equals_quantizing_the_whole(tmp_path):
    from alloy.infer.load import load_for_decoding
    from alloy.infer.optimize import prepare
    import alloy

    _saved(tmp_path / "tiny", 64, 1, 256)
    spec = _saved(tmp_path / "big", 768, 12, 8192)
    assert 95e6 < spec.num_params() < 100e6
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "tiny"), str(tmp_path / "big")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["added"] <= 1.3 * record["size"], (record["added"] / 2**20, record["size"] / 2**20)
    whole = prepare(alloy.load(tmp_path / "big"), "q4_0")  # the same blocks, quantized after a whole load
    with torch.no_grad():
        expected = whole(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1, :8].tolist()
    assert record["logits"] == pytest.approx(expected, rel=0, abs=0)
    stage = load_for_decoding(tmp_path / "big", "q4_0", layers=(4, 8))  # a pipeline stage alike
    assert list(stage.layers) == ["4", "5", "6", "7"] and not stage.has_embed and not stage.has_head


def _same_model(got, want):
    """Module for module, tensor for tensor (bytes, not closeness): the same prepared model."""
    got_modules, want_modules = dict(got.named_modules()), dict(want.named_modules())
    assert {n: type(m) for n, m in got_modules.items()} == {n: type(m) for n, m in want_modules.items()}
    for name, module in got_modules.items():
        if isinstance(module, QuantLinear):
            assert (module.kernel_fmt, module.isa) == (want_modules[name].kernel_fmt, want_modules[name].isa), name
    got_state, want_state = got.state_dict(), want.state_dict()
    assert list(got_state) == list(want_state)
    for name, tensor in got_state.items():
        assert tensor.dtype == want_state[name].dtype and torch.equal(tensor, want_state[name]), name


# Tied heads, fused biases, learned positions, Gemma's scaled embeddings and sandwich norms, experts,
# and the layouts read whole (Phi-3's fused q/k/v and gate/up, GPT-2's transposed Conv1D weights).
CASES = [("llama-tied-bias", "q4_0"), ("llama-tied-bias", "q8_0"), ("llama-tied-bias", "q4_1"),
         ("llama-gqa", "q4_k"), ("qwen2-bias-sliding", "q4_0"), ("gemma3", "q4_0"), ("mixtral", "q4_0"),
         ("phi3-fused-partial", "q4_0"), ("gpt2", "q4_0")]


@pytest.mark.parametrize("name, fmt", CASES)
def test_loading_in_chunks_equals_quantizing_the_loaded_model(tmp_path, name, fmt):
    """Weights left on disk and quantized a chunk at a time (alloy.infer.load) give the very model
    prepare gives from the loaded checkpoint, whole and as a pipeline stage of either end."""
    from hf_cases import build_hf

    import alloy
    from alloy.infer.load import load_for_decoding
    from alloy.infer.optimize import prepare

    width = 256 if fmt == "q4_k" else 64  # one that every block format takes (Q4_K's block is 256)
    widths = {"n_embd": width} if name == "gpt2" else {"hidden_size": width, "intermediate_size": 2 * width}
    build_hf(name, **widths).save_pretrained(tmp_path)
    for layers in (None, (0, 1), (1, 3)):
        got = load_for_decoding(tmp_path, fmt, layers=layers)
        want = prepare(alloy.load(tmp_path, layers=layers), fmt)
        _same_model(got, want)
        if layers is None:
            ids = torch.tensor([[1, 2, 3, 4, 5]])
            with torch.no_grad():
                assert torch.equal(got(ids), want(ids))


def test_loading_in_chunks_with_stand_ins(tmp_path):
    """A stage whose experts run elsewhere: their modules stood in for, the rest as a whole load's."""
    from hf_cases import build_hf

    from alloy.infer.load import load_for_decoding

    build_hf("mixtral", hidden_size=64, intermediate_size=128).save_pretrained(tmp_path)
    whole = load_for_decoding(tmp_path, "q4_0")
    stand_in = torch.nn.Identity()
    stage = load_for_decoding(tmp_path, "q4_0", stand_ins={"layers.1.mlp": stand_in})
    assert stage.layers["1"].mlp is stand_in
    whole_state = whole.state_dict()
    stage_state = stage.state_dict()
    assert set(stage_state) == {n for n in whole_state if not n.startswith("layers.1.mlp.")}
    assert all(torch.equal(t, whole_state[n]) for n, t in stage_state.items())


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k"])
def test_quantizing_into_the_kernel_layout_a_chunk_at_a_time_equals_repacking_after(monkeypatch, fmt):
    """alloy.quant.quantize's `layout`: each chunk's rows interleaved as made, the same bytes as
    interleaving the whole result, whatever the chunk (here 3 groups of rows, the last 2)."""
    from alloy import quant
    from alloy.kernels import quant as kernel_quant

    layout, _, group_rows = kernel_quant.INTERLEAVED[fmt]
    width = quant.get_format(fmt).block_size * 2
    monkeypatch.setattr(quant, "CHUNK_WEIGHTS", 3 * group_rows * width + 5)
    weight = torch.randn(8 * group_rows, width, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = kernel_quant.REPACK[layout][0](quant.quantize(weight, fmt))
    assert torch.equal(quant.quantize(weight, fmt, layout=layout), expected)


def test_a_truncated_checkpoint_is_one_line_when_loading_row_by_row(tmp_path):
    """The row-by-row reader reads the file itself: a cut file is refused before any row is read."""
    import os

    from alloy.errors import CheckpointError
    from alloy.infer.load import load_for_decoding

    _saved(tmp_path, 64, 2, 256)
    weights = next(tmp_path.glob("*.safetensors"))
    os.truncate(weights, weights.stat().st_size - 1000)
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        load_for_decoding(tmp_path, "q4_0")
    assert "\n" not in str(err.value)
