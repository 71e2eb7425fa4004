"""Fusing streams: its peak memory follows the largest shard, not the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from safetensors.torch import save_file

from alloy.model import Transformer
from alloy.runtime.checkpoint import finalize, step_dir
from alloy.runtime.layout import RunLayout
from alloy.spec import ModelSpec

# 8 layers of ~51 MB (fp32) in 8 pipeline stages: a ~412 MB model whose largest shard is ~52 MB.
SPEC = ModelSpec(family="llama", vocab_size=256, hidden_size=1024, num_layers=8, num_heads=8, num_kv_heads=8,
                 head_dim=128, intermediate_size=2816, max_seq_len=128)
MB = 1024**2

MEASURE = """
import json, resource, sys
from alloy.fuse import fuse_run
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB: interpreter, torch, alloy
fuse_run(sys.argv[1], sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_bytes": before * 1024, "peak_bytes": peak * 1024}))
"""


def _write_checkpoint(run_dir: Path) -> list[int]:
    """A checkpoint as the runtime writes it, one stage per layer, built a stage at a time."""
    n = SPEC.num_layers
    layout = RunLayout.of([[(f"cpu{i}", i, i + 1) for i in range(n)]], (n,), (1,))
    root = run_dir / "checkpoints"
    partial = step_dir(root, 1, partial=True)
    partial.mkdir(parents=True)
    sizes = []
    for info in layout.ranks():
        s = info.stage
        stage = Transformer(SPEC, s.layers, embed=s.has_embed, head=s.has_head)
        tensors = {f"param.{k}": v.detach() for k, v in stage.named_parameters()}
        sizes.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        save_file(tensors, str(partial / f"rank{info.rank}.safetensors"))
        (partial / f"rank{info.rank}.json").write_text(json.dumps({"rank": info.rank, "step": 1}))
        del stage, tensors
    finalize(root, 1, SPEC, layout, keep_last=1, extra={})
    return sizes


def test_fusing_peak_memory_stays_near_one_shard(tmp_path):
    sizes = _write_checkpoint(tmp_path / "run")
    total, largest = sum(sizes), max(sizes)
    assert total > 6 * largest  # the point of the test: the whole model is many shards
    result = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path / "run"), str(tmp_path / "fused")],
                            capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    grew = figures["peak_bytes"] - figures["before_bytes"]
    print(f"model {total / MB:.0f} MB, largest shard {largest / MB:.0f} MB, fuse peak +{grew / MB:.0f} MB")
    # A shard's tensors, the output file's serialised copy, and the allocator's slack: a few
    # shards' worth at most — and far below the model, which a non-streaming fuse would hold.
    assert grew < 3 * largest + 64 * MB
    assert grew < total / 2
    fused = sum(p.stat().st_size for p in (tmp_path / "fused").glob("*.safetensors"))
    assert abs(fused - total) < 1 * MB  # everything was written (headers aside)
