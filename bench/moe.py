"""MoE decode on two emulated devices: the planner's expert placement vs. layer-only splits.

Two CPU slices of this machine stand for what llama.cpp users have: a fast device with too little
memory for the model ("fast", declared to hold FAST_MEMORY_FRACTION of what the model needs) and
a slower one with memory to spare ("roomy"), in two scenarios:

  cores    fast = one core, roomy = the other under a 40 % cgroup quota
  quota    fast = a whole core, roomy = a quarter core (both by cgroup quota)

(quotas need root; without them only `cores`, as two plain core sets). Messages between the ranks
are priced with the link's idle latency (alloy.runtime.calibrate): in decoding the ranks take
turns, so a throttled slice is rarely caught mid-period.

A random-weight Mixtral-style model (h1024, 8 layers, 16 experts of width 256, 2 picked a token:
experts are 3/4 of its bytes, attention about 3/4 of what a token reads) generates greedily, one
request, in real processes (alloy.infer.distributed, gloo):

  experts  the best expert placement: every layer's attention on the fast slice, the experts of
           the layers that do not fit there on the roomy one (alloy.plan.experts)
  layers   the best layer-only split the planner finds (what `-ngl` / exo / accelerate do)
  roomy    the roomy slice alone (what runs when the model does not fit the fast device)

Each reports measured decode tokens/s (the decode steps after the first token) beside the
plan's predicted rate; the headline names the planner's choice among them (`alloy plan` picks
the fastest predicted) and the measured-fastest. One measurement:
python -m bench.moe --variant experts-cores [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from alloy.devices import CpuSlice

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # hidden, layers, heads, kv heads, experts, top-k, expert width, vocab, prompt, new tokens
    "quick": (128, 4, 4, 4, 16, 2, 64, 2048, 16, 24),
    "full": (1024, 8, 16, 16, 16, 2, 256, 8192, 32, 64),
}
FAST_MEMORY_FRACTION = 0.5  # of what the whole model needs for this request, at the plan's dtype
SCENARIOS = {
    "cores": (CpuSlice(cores=[0]), CpuSlice(cores=[1], quota=0.4)),
    "quota": (CpuSlice(quota=1.0), CpuSlice(quota=0.25)),
}
PLANS = ("experts", "layers", "roomy")


def scenarios() -> list[str]:
    """Both where cgroup quotas work here; `cores` as plain core sets otherwise."""
    from alloy.devices.emulate import quota_unavailable_reason

    return list(SCENARIOS) if quota_unavailable_reason() is None else ["cores"]


def slices_for(scenario: str) -> tuple[CpuSlice, CpuSlice]:
    from alloy.devices.emulate import quota_unavailable_reason

    if quota_unavailable_reason() is not None:  # two plain core sets: heterogeneous in memory only
        return CpuSlice(cores=[0]), CpuSlice(cores=[1])
    return SCENARIOS[scenario]


VARIANTS = tuple(f"{plan}-{scenario}" for scenario in SCENARIOS for plan in PLANS)
PAIRS = [(f"experts-{s}", f"{other}-{s}", "decode_tokens_per_s") for s in SCENARIOS for other in ("layers", "roomy")]


def hf_config(size: str) -> dict:
    h, layers, heads, kv, experts, top_k, width, vocab, _, _ = SIZES[size]
    return dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=vocab, hidden_size=h,
                intermediate_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, num_local_experts=experts, num_experts_per_tok=top_k,
                max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-5)


def model_dir(size: str) -> Path:
    """The random-weight model, saved once (seeded) under $ALLOY_CACHE_DIR/bench."""
    import hashlib

    key = hashlib.sha256(json.dumps(hf_config(size), sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.environ.get("ALLOY_CACHE_DIR") or Path.home() / ".cache" / "alloy") / "bench" / f"moe-{size}-{key}"
    if (root / "config.json").is_file():
        return root
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = {k: v for k, v in hf_config(size).items() if k not in ("model_type", "architectures")}
    model = MixtralForCausalLM(MixtralConfig(**config))
    partial = root.with_name(root.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(root)
    return root


def inventory(size: str, scenario: str):
    """The two slices, measured inside themselves (cached), the fast one's memory declared small,
    the link between them calibrated by the runtime's own probe."""
    from alloy.devices import DeviceProfile, Inventory, measure_slice
    from alloy.devices.slice_worker import slice_name
    from alloy.plan.timing import build_problem, stage_memory_bytes
    from alloy.runtime.calibrate import calibrate

    devices = []
    for role, piece in zip(("fast", "roomy"), slices_for(scenario)):
        cache = RESULTS / f"moe-slice-{slice_name(piece)}.json"
        if cache.is_file():
            device = DeviceProfile.model_validate_json(cache.read_text())
        else:
            device = measure_slice(piece, name=slice_name(piece), budget_s=1.0, timeout_s=600)
            RESULTS.mkdir(parents=True, exist_ok=True)
            cache.write_text(device.model_dump_json(exclude_none=True))
        devices.append(device.model_copy(update={"name": role}))
    spec, work = model_spec(size), workload(size)
    whole = build_problem(spec, Inventory(devices=devices), work)
    need = float(stage_memory_bytes(whole, 0, spec.num_layers, 1, 1, 1))
    fast = int(FAST_MEMORY_FRACTION * need)
    devices[0] = devices[0].model_copy(update={"memory_bytes": fast, "free_memory_bytes": fast})
    return calibrate(Inventory(name=f"moe-{scenario}", devices=devices))


def model_spec(size: str):
    from alloy.spec import ModelSpec

    return ModelSpec.from_hf_config(hf_config(size))


def workload(size: str):
    from alloy.plan import Workload

    *_, prompt, new = SIZES[size]
    return Workload("infer", 1, prompt, dtype="fp32", new_tokens=new)


def plan_for(variant: str, size: str):
    """`variant` is PLAN-SCENARIO, e.g. experts-cores."""
    from alloy.plan import make_plan
    from alloy.plan.planner import expert_offload_plan

    plan, scenario = variant.split("-")
    spec, inv, work = model_spec(size), inventory(size, scenario), workload(size)
    if plan == "roomy":
        return make_plan(spec, inv, work, device_names=["roomy"])
    if plan == "experts":
        return expert_offload_plan(spec, inv, work)
    return make_plan(spec, inv, work, expert_offload=False)


def planner_choice(size: str, scenario: str) -> str:
    """Which plan `alloy plan` picks on these devices (the fastest it predicts)."""
    from alloy.plan import make_plan
    from alloy.plan.planner import layout_line

    chosen = layout_line(make_plan(model_spec(size), inventory(size, scenario), workload(size)))
    return next((p for p in PLANS if layout_line(plan_for(f"{p}-{scenario}", size)) == chosen), chosen)


def measure(variant: str, size: str) -> dict:
    from alloy.infer.distributed import generate_distributed
    from alloy.infer.partition import stages_from_plan
    from alloy.plan.planner import layout_line

    directory = model_dir(size)
    plan = plan_for(variant, size)
    *_, prompt_len, new = SIZES[size]
    prompt = [(7 * i + 3) % SIZES[size][7] for i in range(prompt_len)]
    tokens, timing = generate_distributed(directory, stages_from_plan(plan), [prompt], max_new_tokens=new,
                                          dtype="fp32", eos_ids=[], timings=True, timeout_s=900)
    measured = timing["decode_tokens"] / timing["decode_s"]
    predicted = 1.0 / plan.predicted.decode_token_s
    return {"decode_tokens_per_s": measured, "predicted_decode_tokens_per_s": predicted,
            "prediction_error": abs(predicted - measured) / measured, "prefill_s": timing["prefill_s"],
            "predicted_prefill_s": plan.predicted.prefill_s, "layout": layout_line(plan),
            "tokens": tokens[0][:8], "size": size}


def variants(quick: bool) -> dict[str, list[str]]:
    return {f"{p}-{s}": ["--variant", f"{p}-{s}"] + (["--quick"] if quick else [])
            for s in scenarios() for p in PLANS}


def headline(summary: dict, machine_flops: dict) -> dict:
    figures, ratios = summary["figures"], summary["ratios"]
    out = {f"{a}_over_{b}": ratios[f"{a}/{b}:{figure}"]["median"] for a, b, figure in PAIRS
           if f"{a}/{b}:{figure}" in ratios}
    for name in VARIANTS:
        if name in figures:
            out[f"{name}_decode_tokens_per_s"] = figures[name]["decode_tokens_per_s"]["median"]
            out[f"{name}_predicted_decode_tokens_per_s"] = figures[name]["predicted_decode_tokens_per_s"]["median"]
            out[f"{name}_prediction_error"] = figures[name]["prediction_error"]["median"]
    return out


def report(samples: dict) -> str:
    """Each plan's layout, predicted and measured; the planner's pick against the measured-fastest."""
    rows = ["| scenario | plan | layout | predicted decode tok/s | measured decode tok/s |",
            "| --- | --- | --- | --- | --- |"]
    picks = []
    for scenario in SCENARIOS:
        measured, size = {}, "full"
        for plan in PLANS:
            runs = [r for r in samples.get(f"{plan}-{scenario}", []) if "decode_tokens_per_s" in r]
            if not runs:
                continue
            size = runs[0]["size"]
            measured[plan] = sorted(r["decode_tokens_per_s"] for r in runs)[len(runs) // 2]
            rows.append(f"| {scenario} | {plan} | {runs[0]['layout']} | "
                        f"{runs[0]['predicted_decode_tokens_per_s']:.1f} | {measured[plan]:.1f} |")
        if measured:
            picks.append(f"{scenario}: the planner picks {planner_choice(size, scenario)}, "
                         f"measured fastest {max(measured, key=measured.get)}")
    return "\n".join(rows + [""] + picks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.variant, "quick" if args.quick else "full")))


if __name__ == "__main__":
    sys.exit(main())
