"""Side-by-side benchmarking: separate processes, alternated A B A B, medians and ratios.

A benchmark module defines `variants(quick) -> dict[name, list[str]]` (the argv of one
measurement each, run as `python -m bench.<module> <argv>` printing one JSON object on its last
stdout line) and `PAIRS`: which variant is compared with which (alloy, baseline, figure).
The harness warms up once, alternates the variants for `reps` rounds — so drift on a shared,
noisy machine hits both sides alike — and reports median and min–max per figure and the ratio
pair by pair (round i of A against round i of B).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_variant(module: str, argv: list[str], timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", f"bench.{module}", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        from alloy.devices.slice_worker import child_error

        raise RuntimeError(f"bench.{module} {' '.join(argv)} failed: {child_error(proc.stderr or proc.stdout)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(module: str, variants: dict[str, list[str]], reps: int, warmup: int = 1,
              timeout_s: float = 900.0, log=print, may_crash: tuple[str, ...] = ()) -> dict[str, list[dict]]:
    """`may_crash`: name prefixes of baselines whose failure is reported (as a crash, and the
    variant dropped) instead of ending the benchmark."""
    samples: dict[str, list[dict]] = {name: [] for name in variants}
    crashed: dict[str, str] = {}
    for round_index in range(-warmup, reps):
        for name, argv in variants.items():
            if name in crashed:
                continue
            started = time.perf_counter()
            try:
                result = run_variant(module, argv, timeout_s)
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                if not name.startswith(may_crash) or not may_crash:
                    raise
                crashed[name] = " ".join(str(err).split())[:300]
                log(f"  {'crashed':>11}  {name:<24} {crashed[name]}")
                continue
            tag = "warm-up" if round_index < 0 else f"round {round_index + 1}/{reps}"
            log(f"  {tag:>11}  {name:<24} {time.perf_counter() - started:6.1f} s  {_short(result)}")
            if round_index >= 0:
                samples[name].append(result)
    for name, why in crashed.items():  # kept as a record; no figure to compare
        samples[name] = [{"crashed": why}] if not samples[name] else samples[name]
    return samples


def summarize(samples: dict[str, list[dict]], pairs: list[tuple[str, str, str]]) -> dict:
    figures = {}
    samples = {name: runs for name, runs in samples.items() if runs and "crashed" not in runs[0]}
    for name, runs in samples.items():
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        figures[name] = {k: _stats([r[k] for r in runs]) for k in keys}
    ratios = {}
    for a, b, key in pairs:
        if a not in samples or b not in samples:  # a variant this machine leaves out
            continue
        values = [ra[key] / rb[key] for ra, rb in zip(samples[a], samples[b]) if rb[key]]
        ratios[f"{a}/{b}:{key}"] = _stats(values)
    return {"figures": figures, "ratios": ratios}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _short(result: dict) -> str:
    shown = [f"{k}={v:.4g}" for k, v in result.items() if isinstance(v, float)][:3]
    return " ".join(shown)


def environment() -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or "unknown",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cores": len(__import__("os").sched_getaffinity(0)),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def save(name: str, record: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def markdown(name: str, summary: dict) -> str:
    lines = [f"### {name}", "", "| variant | figure | median | min – max |", "| --- | --- | --- | --- |"]
    for variant, figures in summary["figures"].items():
        for key, s in figures.items():
            lines.append(f"| {variant} | {key} | {s['median']:.4g} | {s['min']:.4g} – {s['max']:.4g} |")
    if summary["ratios"]:
        lines += ["", "| ratio (pair by pair) | median | min – max |", "| --- | --- | --- |"]
        for key, s in summary["ratios"].items():
            lines.append(f"| {key} | {s['median']:.3f} | {s['min']:.3f} – {s['max']:.3f} |")
    return "\n".join(lines)
