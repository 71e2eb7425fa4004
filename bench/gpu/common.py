"""Shared by the GPU benchmarks: model sizes, arguments, timing, statistics and JSON output."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# The ~1B Llama of the issue (untied head: 1.10e9 parameters) and a tiny one for CPU smoke runs
# (widths multiples of 32, which the GGUF block formats but Q4_K take).
SIZES = {
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=32000, max_positions=4096),
    "tiny": dict(hidden=64, layers=4, heads=4, kv_heads=2, ffn=192, vocab=512, max_positions=256),
}
# Datasheet figures of the NVIDIA H200 (SXM), the machine this is prepared for; the measured
# rates are reported beside them because a VM's clocks and copies fall short of the sheet.
H200_PEAK_BF16_FLOPS_PER_S = 989e12  # dense bf16 tensor-core peak
H200_HBM_BYTES_PER_S = 4.8e12
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def llama_config(size: str):
    import transformers

    s = SIZES[size]
    return transformers.LlamaConfig(
        hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], intermediate_size=s["ffn"], vocab_size=s["vocab"],
        max_position_embeddings=s["max_positions"], tie_word_embeddings=False)


def alloy_spec(config):
    import alloy

    return alloy.ModelSpec.from_hf_config(config.to_dict())


def parser(doc: str, rounds_help: str) -> argparse.ArgumentParser:
    """The options every measurement takes: device, tiny, out, budget, rounds (`rounds_help`) and dtype."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help=rounds_help)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", choices=["cuda", "cpu"], required=True)
    p.add_argument("--tiny", action="store_true", help="tiny model and sizes: a smoke test of the code path")
    p.add_argument("--out", default=None, help="write the result JSON here (rewritten after every sample)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new round after this many seconds (the result is still written)")
    return p


def check_args(p: argparse.ArgumentParser, args) -> torch.device:
    """The torch device, or a one-line error for arguments that cannot work."""
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs CUDA, but torch.cuda.is_available() is False here; use --device cpu --tiny")
    for name in ("reps", "rounds", "steps", "new_tokens"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error(f"--budget-s must be > 0, got {args.budget_s}")
    return torch.device("cuda:0" if args.device == "cuda" else "cpu")


def sync(device: torch.device) -> None:
    """Wait for queued kernels: CUDA runs asynchronously to the host clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Drop what the last model left, so the next one starts from the same empty allocator."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def stats(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def pairwise_ratios(a: list[float], b: list[float]) -> dict:
    """Round i of A over round i of B: drift on a shared machine hits both sides of a pair alike."""
    return stats([x / y for x, y in zip(a, b) if y])


def gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Record:
    """The result document: rewritten after every sample, so a run killed by its timeout keeps
    what it measured; printed as one JSON line at the end (what the smoke tests read)."""

    def __init__(self, measurement: str, args, **fields):
        self.path = Path(args.out) if args.out else None
        self.started = time.perf_counter()
        self.budget_s = args.budget_s
        self.doc = {"measurement": measurement, "device": args.device, "tiny": args.tiny,
                    "gpu": None, "complete": False, **fields, "samples": [], "errors": []}

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.started > self.budget_s

    def rounds(self, n: int, where: str = ""):
        """range(n), but no new round once the budget is spent; the result says where it stopped."""
        for r in range(n):
            if r and self.out_of_time():
                self.doc["stopped_early"] = f"budget of {self.budget_s} s reached after {r} rounds{where}"
                return
            yield r

    def add(self, sample: dict) -> None:
        self.doc["samples"].append(sample)
        print(f"  {json.dumps(sample)}", file=sys.stderr)
        self.save()

    def error(self, where: str, err: BaseException) -> None:
        line = f"{where}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        self.doc["errors"].append(line)
        print(f"  error {line}", file=sys.stderr)
        self.save()

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.started, 2)
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=str))
        tmp.replace(self.path)

    def finish(self, **fields) -> int:
        self.doc.update(fields)
        self.doc["complete"] = True
        self.save()
        print(json.dumps(self.doc, default=str))
        # Exit 1 when any sample failed, so gpu.sh's log shows it; the samples taken are kept.
        return 1 if self.doc["errors"] else 0
