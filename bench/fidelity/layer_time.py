"""Per-layer time from the analytic cost model (FLOPs and bytes from the ModelSpec), held against
Helix's measured vLLM per-layer profiles.

Roofline of one layer: t = max(FLOPs / F, bytes / B), with F = e_compute x peak FLOP/s and
B = e_memory x peak bytes/s of the device type's datasheet. Each device type gets its two
efficiencies — exactly the two numbers a measured Alloy DeviceProfile carries (matmul rate and
memory bandwidth) — fitted on ONE batch size of LLaMA-2-70B (prefill 2000 tokens for F, decode
batch 8 for B). Every other batch size, and all of LLaMA-30B, is a prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

from alloy.plan.cost import Workload, model_costs
from alloy.spec import ModelSpec

# fp16 dense tensor-core peak FLOP/s and memory bytes/s per GPU (vendor datasheets).
DATASHEET = {
    "A100": (312e12, 1.555e12),
    "V100": (125e12, 0.900e12),
    "L4": (121e12, 0.300e12),
    "T4": (65e12, 0.320e12),
}
FIT_PREFILL_TOKENS = 2000
FIT_DECODE_BATCH = 8
# Decode requests' context while the profile was taken is not published; the Azure Conversation
# trace the serving runs used averages 750 prompt + 240 generated tokens.
DECODE_CONTEXT = 750 + 240 // 2
DTYPE = "fp16"


def peak(machine_type: str) -> tuple[float, float]:
    """Datasheet peak of a machine; 'T4x4' is four T4 acting as one (tensor-parallel) stage."""
    from bench.fidelity.helix import gpus_in

    gpu, n = gpus_in(machine_type)
    flops, bandwidth = DATASHEET[gpu]
    return flops * n, bandwidth * n


def prefill_work(spec: ModelSpec, tokens: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one layer over a prompt batch of `tokens` (one sequence)."""
    c = model_costs(spec, Workload(task="infer", batch_size=1, seq_len=tokens, dtype=DTYPE, new_tokens=0))
    return float(c.layer_step_flops_per_sample[0]), float(c.layer_params[0] * c.dtype_bytes)


def decode_work(spec: ModelSpec, batch: int) -> tuple[float, float]:
    """(FLOPs, bytes) of one layer for one decode step of `batch` requests: weights + their KV."""
    c = model_costs(spec, Workload(task="infer", batch_size=1, seq_len=DECODE_CONTEXT, dtype=DTYPE, new_tokens=0))
    kv_read = DECODE_CONTEXT * 2 * spec.num_kv_heads * spec.head_dim * c.dtype_bytes
    flops = 2 * c.layer_params[0] + 4 * spec.num_heads * spec.head_dim * DECODE_CONTEXT
    return float(batch * flops), float(c.layer_params[0] * c.dtype_bytes + batch * kv_read)


@dataclass(frozen=True)
class Roofline:
    flops: float  # sustained FLOP/s
    bytes_per_s: float  # sustained memory bytes/s

    def time_s(self, work: tuple[float, float]) -> float:
        flops, nbytes = work
        return max(flops / self.flops, nbytes / self.bytes_per_s)


def fit_roofline(spec: ModelSpec, prefill_s: float, decode_s: float) -> Roofline:
    """F from a prefill time at FIT_PREFILL_TOKENS, B from a decode time at FIT_DECODE_BATCH."""
    flops, _ = prefill_work(spec, FIT_PREFILL_TOKENS)
    _, nbytes = decode_work(spec, FIT_DECODE_BATCH)
    return Roofline(flops=flops / prefill_s, bytes_per_s=nbytes / decode_s)


def efficiency(machine_type: str, roof: Roofline) -> tuple[float, float]:
    """(compute, memory) efficiency of a fitted roofline against the datasheet peak."""
    f, b = peak(machine_type)
    return roof.flops / f, roof.bytes_per_s / b
