"""A small training workspace shared by the `alloy train` tests: a tiny Llama, three unequal
declared CPUs (the planner spreads the model over more than one worker), a learnable corpus."""

from __future__ import annotations

import json
from pathlib import Path

MODEL = dict(model_type="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)
CLUSTER = {"name": "three-cpus", "devices": [
    {"name": f"cpu{i}", "kind": "cpu", "memory_bytes": 2**30, "matmul_flops": {"fp32": rate},
     "memory_bandwidth_bytes_per_s": 1e10, "threads": 1} for i, rate in enumerate((4e9, 2e9, 1e9))]}
TEXT = "".join(f"the {w} sat on the mat and the {w} saw the hat.\n" for w in ("cat", "dog", "bird", "fox") * 150)


def make_workspace(root: Path) -> Path:
    (root / "model.json").write_text(json.dumps(MODEL))
    (root / "cluster.json").write_text(json.dumps(CLUSTER))
    (root / "corpus.txt").write_text(TEXT)
    return root


def write_config(workspace: Path, out: str, **overrides) -> Path:
    """workspace/OUT.yaml: 8 steps of 6 x 32 tokens over the cluster, checkpoints every 4, into workspace/OUT."""
    config = {"model": str(workspace / "model.json"), "data": {"path": str(workspace / "corpus.txt")},
              "devices": str(workspace / "cluster.json"), "batch_size": 6, "seq_len": 32, "steps": 8,
              "checkpoint": {"every": 4, "keep_last": 2}, "optimizer": {"lr": 3e-3},
              "out_dir": str(workspace / out)} | overrides
    path = workspace / f"{out}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path
