"""One summary JSON over a GPU run: the machine and versions, the headline figures of each
measurement, its exit status, and every raw sample (each measurement's result, whole).

Run (gpu.sh does): python -m bench.gpu.summary --dir OUT [--status train=0 decode=124 ...]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench.harness import cpu_model

MEASUREMENTS = ("train", "decode", "partition")
OPTIONAL = ("decode_q4_0",)  # gpu.sh runs it on a GPU only: Alloy in Q4_0 against transformers in bf16
PACKAGES = ("torch", "transformers", "accelerate", "pydantic", "numpy", "safetensors")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(argv: list[str]) -> str | None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):  # the tool is not installed there, or hung
        return None
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def environment(commit: str | None) -> dict:
    import torch

    root = Path(__file__).resolve().parents[2]
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        # The device machine gets a copy of the tree without .git: gpu.sh passes ALLOY_COMMIT then.
        "commit": commit or _command(["git", "-C", str(root), "rev-parse", "HEAD"]) or "unknown",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None,
        "nvidia_smi": _command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                "--format=csv,noheader"]),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def headline(results: dict) -> dict:
    """The figures worth quoting, by measurement (medians; ratios are Alloy / baseline)."""
    out = {}
    train = results.get("train", {}).get("summary")
    if train:
        for impl in ("alloy", "transformers"):
            for key in ("tokens_per_s", "mfu_vs_peak", "mfu_vs_measured"):
                out[f"train_{impl}_{key}"] = train[impl][key].get("median")
        out["train_ratio"] = train["ratio_tokens_per_s"].get("median")
    for name in ("decode", *OPTIONAL):
        for key, value in (results.get(name, {}).get("summary") or {}).items():
            if key.startswith("ratio"):
                out[f"{name}_{key}"] = value.get("median")
                continue
            for figure, s in value.items():
                out[f"{name}_{key}_{figure}"] = s.get("median")
    partition = results.get("partition", {}).get("summary")
    if partition:
        for key, value in partition.items():
            if isinstance(value, dict) and "tokens_per_s" in value:
                out[f"partition_{key}_tokens_per_s"] = value["tokens_per_s"].get("median")
                if "placement" in value:
                    out[f"partition_{key}_layers"] = placement_words(value["placement"])
            elif isinstance(value, dict):
                out[f"partition_{key}"] = value.get("median")
            else:
                out[f"partition_{key}"] = value
    return out


def placement_words(placement: dict) -> str:
    """'cuda:0 layers 0-7 + embed | cpu layers 7-15 + head' from either side's placement record."""
    if "stages" in placement:  # Alloy: contiguous stages in pipeline order
        return " | ".join(f"{s['device']} layers {s['layers'][0]}-{s['layers'][1] - 1}"
                          + " + embed" * s["has_embed"] + " + head" * s["has_head"] for s in placement["stages"])
    parts = []
    for device, held in placement.get("devices", {}).items():
        layers = sorted(held["layers"])
        words = f"{device} layers {layers[0]}-{layers[-1]}" if layers else f"{device}"
        parts.append(" + ".join([words, *[m for m in held["modules"] if m]]))
    return " | ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="the folder holding train.json, decode.json, partition.json")
    p.add_argument("--status", nargs="*", default=[], help="NAME=EXIT_CODE for each measurement, from gpu.sh")
    p.add_argument("--commit", default=os.environ.get("ALLOY_COMMIT") or None)
    args = p.parse_args(argv)
    directory = Path(args.dir)
    if not directory.is_dir():
        p.error(f"--dir {directory}: no such folder")
    status = {}
    for item in args.status:
        name, sep, code = item.partition("=")
        if not sep or not code.lstrip("-").isdigit():
            p.error(f"--status takes NAME=EXIT_CODE, got {item!r}")
        status[name] = int(code)
    results, missing = {}, []
    for name in MEASUREMENTS:
        path = directory / f"{name}.json"
        try:
            results[name] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            missing.append(f"{name}: {type(err).__name__}: {err}")
    for name in OPTIONAL:
        if (directory / f"{name}.json").is_file():
            results[name] = json.loads((directory / f"{name}.json").read_text())
    summary = {"environment": environment(args.commit), "status": status, "missing": missing,
               "headline": headline(results), "results": results}
    (directory / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for key, value in summary["headline"].items():
        print(f"{key:<58} {value:.4g}" if isinstance(value, float) else f"{key:<58} {value}")
    for line in missing:
        print(f"missing {line}", file=sys.stderr)
    print(f"summary: {directory / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
