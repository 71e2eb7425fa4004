"""KV-cache budget per machine type, read off Helix's vLLM caps (`derived/machine_layer_limits.csv`).

Each row gives, for k layers on a machine, the most decode tokens vLLM let it batch. Where that cap
falls with k, memory binds: cap(k) * k * slot_tokens * kv_bytes = budget - k * layer_bytes, i.e.
cap(k) * k is linear in k. Slope and intercept give both the tokens of KV held per decode slot (it
comes out at 830-930, close to the trace's mean context 750 + 240 / 2, a check on the reading) and the
memory `budget` left for weights and KV after vLLM's own reserve. Every Helix worker also holds
the embedding and LM head: the file's `param_gb_at_max_layers` equals k layers + embedding + head
(GiB) in every row, so a node's weights include both.

Nothing here is fitted to a throughput figure; only the caps file is read.

Beyond the layer counts the caps were profiled at (the 70B separate pipelines put 20 layers on an
A100 whose caps stop at 12, 10 on an L4 (7), 7 on a T4 (4)), the per-type budget is an assumption
carried past its support, and for the A100 it leaves no KV at all although that pipeline measured
68.7 tok/s. There the physical bound is used instead (`physical_budgets`): vLLM's memory fraction
(0.9: vLLM's default, and what the data records for those runs, "vLLM mem 0.9") x the GPU memory of
`machine_profiles.ini` minus a per-GPU reserve (CUDA context, vLLM's profiling activations, ECC).
That reserve is not fitted to throughput: it is the median over the caps file's seven machine types
of 0.9 x VRAM - fitted budget, per GPU (1.0 to 4.3 GiB, median 3.0 GiB). GPU memory sizes are
binary (an "A100 40GB" has 40 GiB), so `vram_size = 40 * GB` is read as 40 GiB here.
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np

from alloy.plan.cost import Workload, model_costs
from alloy.spec import ModelSpec

VLLM_MEMORY_FRACTION = 0.9  # vLLM's default gpu_memory_utilization; the data marks the 70B SP runs "vLLM mem 0.9"
MODEL_ROWS = {"llama2_70b": "llama70b", "llama1_30b": "llama30b"}
FILE = "Helix-ASPLOS25/derived/machine_layer_limits.csv"


@functools.lru_cache(maxsize=16)
def _costs(spec: ModelSpec):
    return model_costs(spec, Workload(task="infer", batch_size=1, seq_len=750, dtype="fp16", new_tokens=240))


def weight_bytes(spec: ModelSpec, layers: int) -> float:
    """k layers plus embedding and LM head, fp16 (what one Helix worker loads)."""
    c = _costs(spec)
    return float((c.layer_params[0] * layers + c.embed_params + c.head_params) * c.dtype_bytes)


def kv_bytes_per_token_layer(spec: ModelSpec) -> float:
    c = _costs(spec)
    return float(c.layer_kv_bytes_per_sample[0] / (750 + 240))  # the per-sample figure is for a 990-token context


def read_caps(root: Path) -> dict[tuple[str, str], dict[int, int]]:
    """(model, machine type) -> {layers: max decode tokens}."""
    out = {}
    for r in csv.DictReader((root / FILE).open()):
        caps = dict(tuple(int(v) for v in x.split(":")) for x in r["decode_max_tokens_by_layers"].split())
        out[(MODEL_ROWS[r["model"]], r["machine"])] = caps
    return out


def fit_budget(spec: ModelSpec, caps: dict[int, int]) -> tuple[float, float] | None:
    """(budget bytes for weights + KV, tokens per decode slot) from the falling part of the caps."""
    falling = [k for k in sorted(caps) if caps[k] < caps[min(caps)]]
    if len(falling) < 2:
        return None  # the cap never binds on memory for this model: no information
    slope, intercept = np.polyfit(falling, [caps[k] * k for k in falling], 1)
    kv = kv_bytes_per_token_layer(spec)
    slot_tokens = -_costs(spec).layer_params[0] * 2 / (slope * kv)
    budget = intercept * slot_tokens * kv + weight_bytes(spec, 0)
    return float(budget), float(slot_tokens)


def kv_budgets(root: Path, specs: dict[str, ModelSpec]) -> dict[str, float]:
    """machine type -> memory budget (bytes) for weights + KV, median over the models that bind."""
    fits: dict[str, list[float]] = {}
    for (model, machine), caps in read_caps(root).items():
        if model in specs and (fit := fit_budget(specs[model], caps)):
            fits.setdefault(machine, []).append(fit[0])
    return {m: float(np.median(v)) for m, v in fits.items()}


def vram_bytes(machine_profiles: dict[str, dict[str, float]]) -> dict[str, float]:
    """machine type -> GPU memory bytes, `vram_size = 40 * GB` read as 40 GiB (the importer's GB is 1e9)."""
    return {t: v["vram_size"] / 1e9 * 2**30 for t, v in machine_profiles.items() if v.get("vram_size", -1) > 0}


def gpus_in(machine: str) -> int:
    return int(machine.split("x")[1]) if "x" in machine else 1


def reserves_per_gpu(budgets: dict[str, float], vram: dict[str, float]) -> dict[str, float]:
    """machine type -> (fraction x VRAM - fitted budget) / GPUs: vLLM's non-KV, non-weight use per GPU (bytes)."""
    return {t: (VLLM_MEMORY_FRACTION * vram[t] - b) / gpus_in(t) for t, b in budgets.items() if t in vram}


def reserve_per_gpu(budgets: dict[str, float], vram: dict[str, float]) -> float:
    """The median over machine types of `reserves_per_gpu`."""
    return float(np.median(list(reserves_per_gpu(budgets, vram).values())))


def physical_budgets(budgets: dict[str, float], vram: dict[str, float], reserve: float | None = None) -> dict[str, float]:
    """machine type -> fraction x VRAM - GPUs x reserve per GPU (bytes for weights + KV); the reserve
    defaults to the median one (`reserve_per_gpu`)."""
    reserve = reserve_per_gpu(budgets, vram) if reserve is None else reserve
    return {t: VLLM_MEMORY_FRACTION * v - gpus_in(t) * reserve for t, v in vram.items()}
