"""MoE decode on two emulated devices: the planner's expert placement vs. layer-only splits.

Two CPU slices of this machine stand for what llama.cpp users have: a fast device with too little
memory for the model ("fast": a whole core, declared to hold FAST_MEMORY_FRACTION of what the
model needs) and a slow one with memory to spare ("roomy": a quarter core under a cgroup quota,
or the other core where quotas are unavailable). A random-weight Mixtral-style model (its experts
most of its bytes, 2 of 32 picked a token) generates greedily, one request, in real processes
(alloy.infer.distributed, gloo):

  experts  the best expert placement: every layer's attention on the fast slice, the experts of
           the layers that do not fit there on the roomy one (alloy.plan.experts)
  layers   the best layer-only split the planner finds (what `-ngl` / exo / accelerate do)
  roomy    the roomy slice alone (what runs when the model does not fit the fast device)

Each reports measured decode tokens/s (the decode steps after the first token) beside the
plan's predicted rate; the headline names the planner's choice among them (`alloy plan` picks
the fastest predicted) and the measured-fastest. One measurement:
python -m bench.moe --variant experts [--quick]
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
    "quick": (128, 4, 4, 2, 8, 2, 256, 2048, 16, 24),
    "full": (512, 8, 8, 4, 32, 2, 512, 8192, 32, 64),
}
FAST_MEMORY_FRACTION = 0.5  # of what the whole model needs for this request, at the plan's dtype
VARIANTS = ("experts", "layers", "roomy")
PAIRS = [("experts", "layers", "decode_tokens_per_s"), ("experts", "roomy", "decode_tokens_per_s")]


def hf_config(size: str) -> dict:
    h, layers, heads, kv, experts, top_k, width, vocab, _, _ = SIZES[size]
    return dict(model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=vocab, hidden_size=h,
                intermediate_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, num_local_experts=experts, num_experts_per_tok=top_k,
                max_position_embeddings=1024, tie_word_embeddings=False, rms_norm_eps=1e-5)


def model_dir(size: str) -> Path:
    """The random-weight model, saved once (seeded) under $ALLOY_CACHE_DIR/bench."""
    root = Path(os.environ.get("ALLOY_CACHE_DIR") or Path.home() / ".cache" / "alloy") / "bench" / f"moe-{size}"
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


def slices() -> tuple[CpuSlice, CpuSlice]:
    from alloy.devices.emulate import quota_unavailable_reason

    if quota_unavailable_reason() is None:
        return CpuSlice(quota=1.0), CpuSlice(quota=0.25)
    return CpuSlice(cores=[0]), CpuSlice(cores=[1])


def inventory(size: str):
    """The two slices, measured inside themselves (cached), the fast one's memory declared small,
    the link between them calibrated by the runtime's own probe."""
    from alloy.devices import DeviceProfile, Inventory, measure_slice
    from alloy.devices.slice_worker import slice_name
    from alloy.plan.timing import build_problem, stage_memory_bytes
    from alloy.runtime.calibrate import calibrate

    devices = []
    for role, piece in zip(("fast", "roomy"), slices()):
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
    return calibrate(Inventory(name="moe-two-slices", devices=devices))


def model_spec(size: str):
    from alloy.spec import ModelSpec

    return ModelSpec.from_hf_config(hf_config(size))


def workload(size: str):
    from alloy.plan import Workload

    *_, prompt, new = SIZES[size]
    return Workload("infer", 1, prompt, dtype="fp32", new_tokens=new)


def plan_for(variant: str, size: str):
    from alloy.plan import make_plan
    from alloy.plan.planner import expert_offload_plan

    spec, inv, work = model_spec(size), inventory(size), workload(size)
    if variant == "roomy":
        return make_plan(spec, inv, work, device_names=["roomy"])
    if variant == "experts":
        return expert_offload_plan(spec, inv, work)
    return make_plan(spec, inv, work, expert_offload=False)


def planner_choice(size: str) -> str:
    """Which variant `alloy plan` picks on these devices (the fastest it predicts)."""
    from alloy.plan import make_plan
    from alloy.plan.planner import layout_line

    chosen = layout_line(make_plan(model_spec(size), inventory(size), workload(size)))
    return next((v for v in VARIANTS if layout_line(plan_for(v, size)) == chosen), chosen)


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
    return {v: ["--variant", v] + (["--quick"] if quick else []) for v in VARIANTS}


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
    rows = ["| variant | layout | predicted decode tok/s | measured decode tok/s |", "| --- | --- | --- | --- |"]
    measured, size = {}, "full"
    for name in VARIANTS:
        runs = [r for r in samples.get(name, []) if "decode_tokens_per_s" in r]
        if not runs:
            continue
        size = runs[0]["size"]
        measured[name] = sorted(r["decode_tokens_per_s"] for r in runs)[len(runs) // 2]
        rows.append(f"| {name} | {runs[0]['layout']} | {runs[0]['predicted_decode_tokens_per_s']:.1f} | "
                    f"{measured[name]:.1f} |")
    fastest = max(measured, key=measured.get) if measured else "-"
    rows.append(f"\nthe planner picks: {planner_choice(size)}; measured fastest: {fastest}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.variant, "quick" if args.quick else "full")))


if __name__ == "__main__":
    sys.exit(main())
