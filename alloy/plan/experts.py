"""Expert placement for mixture-of-experts inference: a layer's experts on another device than its
attention.

A MoE model's memory is mostly experts, but a token reads only k of E of them. Splitting by layers
(what llama.cpp's `-ngl`, exo and accelerate do) puts whole layers, attention and all, on the big
slow device once the fast one is full. Here the fast device ("host") keeps every layer's attention,
the embeddings, the head, the KV cache and the experts of layers [0, start); a device with memory
to spare holds the MoE modules (router + experts) of layers [start, L) and runs them on the hidden
states the host sends it, one round trip per MoE layer (what llama.cpp users write by hand as
`--override-tensor "blk\\.(N|...)\\.ffn_.*_exps=CPU"`).

Priced with the same roofline as every other inference stage (timing.decode_token_s): a decode
step reads the weights it uses (only the experts its tokens picked) and the KV cache at the
device's bandwidth, or runs its FLOPs at the device's rate, whichever is slower; each round trip
pays the link's latency twice and its bandwidth for the hidden states. The search tries every
(host, expert device) pair among the fastest and roomiest few and every start layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from alloy.plan.timing import Problem, decode_read_and_flops, hop_bytes_per_s, stage_memory_bytes

CANDIDATES = 4  # hosts among the fastest, expert devices among the roomiest (pairs: at most 16)


@dataclass(frozen=True)
class Offload:
    host: int  # device index: attention of every layer, embeddings, head, experts of [0, start)
    experts: int  # device index: the MoE modules of layers [start, L)
    start: int
    step_s: float  # prefill + new_tokens decode steps, the whole batch
    prefill_s: float
    decode_token_s: float
    host_memory_bytes: float
    expert_memory_bytes: float
    host_busy_s: float
    expert_busy_s: float
    round_trips_s: float  # the hidden states' trips, per step

    @property
    def fits(self) -> bool:
        return np.isfinite(self.step_s)


def moe_bytes(p: Problem, start, stop):
    """Weights (in the plan's dtype) of the MoE modules of layers [start, stop)."""
    c = p.costs
    return (p.prefix_moe_layers[stop] - p.prefix_moe_layers[start]) * float(np.max(c.layer_moe_params)) * c.dtype_bytes


def price(p: Problem, host: int, experts: int, start: int) -> Offload:
    """Time and memory of one placement, the whole batch in one group (one request stream)."""
    w, c, L = p.work, p.costs, p.num_layers
    mb = w.batch_size
    moe_layers = float(p.prefix_moe_layers[L] - p.prefix_moe_layers[start])
    moved_params = moe_bytes(p, start, L)
    # decode: one token for every request
    read, flops = decode_read_and_flops(p, 0, L, mb)
    moved_read = moe_layers * (c.router_params + c.experts_read(mb) * c.expert_params) * c.dtype_bytes
    moved_flops = mb * moe_layers * float(np.max(c.layer_moe_flops_per_token))
    host_token_s = max((read - moved_read) / p.memory_bandwidth_bytes_per_s[host],
                       (flops - moved_flops) / p.flops[host])
    expert_token_s = max(moved_read / p.memory_bandwidth_bytes_per_s[experts], moved_flops / p.flops[experts])
    bw, lat = hop_bytes_per_s(p, host, experts), p.link_latency_s[host, experts]
    trip_token_s = 2 * moe_layers * (lat + mb * c.boundary_decode_bytes_per_sample / bw)
    decode_s = host_token_s + expert_token_s + trip_token_s
    # prefill: every prompt token, the head on the last position only
    total_flops = mb * (p.prefix_step_flops[L] + c.head_step_flops_per_sample)
    moved_prefill = mb * w.seq_len * moe_layers * float(np.max(c.layer_moe_flops_per_token))
    host_prefill_s = (total_flops - moved_prefill) / p.flops[host]
    expert_prefill_s = moved_prefill / p.flops[experts]
    trip_prefill_s = 2 * moe_layers * (lat + mb * c.boundary_bytes_per_sample / bw)
    prefill_s = host_prefill_s + expert_prefill_s + trip_prefill_s
    step_s = prefill_s + w.new_tokens * decode_s
    host_memory = float(stage_memory_bytes(p, 0, L, 1, mb, mb, host)) - moved_params
    # the expert device: its weights and one layer's transients for the batch
    expert_memory = moved_params + mb * p.max_layer_peak_bytes_per_sample
    fits = host_memory <= p.memory_bytes[host] and expert_memory <= p.memory_bytes[experts]
    return Offload(host, experts, start, step_s if fits else np.inf, prefill_s, decode_s, host_memory,
                   expert_memory, host_prefill_s + w.new_tokens * host_token_s,
                   expert_prefill_s + w.new_tokens * expert_token_s,
                   trip_prefill_s + w.new_tokens * trip_token_s)


def best_offload(p: Problem) -> Offload | None:
    """The fastest placement that fits, or None (a dense model, one device, or nothing fits)."""
    if p.work.task != "infer" or not p.costs.num_experts or len(p.devices) < 2:
        return None
    order = range(len(p.devices))
    hosts = sorted(order, key=lambda d: -p.flops[d])[:CANDIDATES]
    roomy = sorted(order, key=lambda d: -p.memory_bytes[d])[:CANDIDATES]
    L = p.num_layers
    starts = [s for s in range(L) if p.prefix_moe_layers[L] - p.prefix_moe_layers[s] > 0]
    best = None
    for host in hosts:
        for experts in roomy:
            if experts == host:
                continue
            for start in starts:
                found = price(p, host, experts, start)
                if found.fits and (best is None or found.step_s < best.step_s):
                    best = found
    return best
