"""Loading a model as GGUF blocks builds it layer by layer (alloy.infer.load): the whole checkpoint
is never in memory, in its own dtype or in fp32, beside the blocks.

Measured in a fresh process on a ~98M Llama saved in bf16 (h768, 12 layers, vocab 8192): the
process's peak RSS over its resident size before the load (after warming every code path on a
tiny model, so that libraries and kernels count as the interpreter) against the bytes of the
loaded model's tensors. Loading whole then quantizing peaked at 6.7x the blocks (the bf16
checkpoint, 196 MB, plus its fp32 conversions); layer by layer, 1.53-2.10x over 13 runs (Xeon
AVX-512; the allocator's retention varies from run to run, hence the bound of 2.6x): one
layer as read (14 MB of bf16), its safetensors pages while the file is mapped, its fused q/k/v and
gate/up copies, and the quantizer's temporaries ride on top of the blocks. The issue's target is
1.3x; this test holds what is reached with margin, so that a whole-model load (6.7x) cannot come back.
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
    assert record["added"] <= 2.6 * record["size"], (record["added"] / 2**20, record["size"] / 2**20)
    whole = prepare(alloy.load(tmp_path / "big"), "q4_0")  # the same blocks, quantized after a whole load
    with torch.no_grad():
        expected = whole(torch.tensor([[1, 2, 3, 4, 5]]))[0, -1, :8].tolist()
    assert record["logits"] == pytest.approx(expected, rel=0, abs=0)
    stage = load_for_decoding(tmp_path / "big", "q4_0", layers=(4, 8))  # a pipeline stage alike
    assert list(stage.layers) == ["4", "5", "6", "7"] and not stage.has_embed and not stage.has_head
