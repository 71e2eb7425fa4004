"""GPU + CPU inference of a model that does not fit the capped GPU: Alloy's plan vs. accelerate.

One model (the ~1B Llama, bf16) is saved once; both sides load the same weights from it. The GPU
is capped twice over, the same for both: a `max_memory` budget that holds about half the weights
(accelerate's device_map="auto" fills it; Alloy's planner sees it as cuda:0's memory), and
torch.cuda.set_per_process_memory_fraction at budget + headroom as the hard limit.
Alloy: measure cpu and cuda:0 (alloy.devices), plan the split (alloy.plan make_plan, task
"infer", one replica), run it with alloy.infer.partition.Pipeline: the CPU computes its layers.
accelerate: device_map="auto"; its "cpu" layers stay in host memory and are copied to the GPU
and computed there at every forward. Rounds alternate A B A B, each loading afresh.
Without CUDA (--device cpu --tiny) a CPU-kind device named "capped" stands in for the GPU, so
the same measure -> plan -> Pipeline path runs (both stages on the CPU).
Run: python -m bench.gpu.partition --device cuda [--rounds 2] [--out partition.json]
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
import time
from collections import defaultdict

import torch

from bench.gpu import common

IMPLS = ("alloy", "accelerate")
BATCHES = (1, 8)
PROMPT_TOKENS = 16
HEADROOM_BYTES = 512 << 20  # hard cap above the budget: KV cache, activations, streamed layers, workspace
MEASURE_BUDGET_S = {"1b": 2.0, "tiny": 0.5}  # per device, for alloy.devices.measure
GIB = 2**30


def save_model(config, device: torch.device, dtype: torch.dtype, directory: str) -> int:
    """Initialise the model once and write it as an HF directory; its weight bytes."""
    import transformers

    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters on the GPU takes a fraction of the CPU's time
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    common.free(device)
    return weight_bytes


def inventory(device: torch.device, budget_bytes: int, size: str, dtype: str, notes: list[str]):
    """cpu and the capped device, measured here; the capped one's memory set to the budget."""
    from alloy.devices import Inventory, Link
    from alloy.devices.discovery import discover
    from alloy.devices.measure import matmul_flops, measure

    found = {d.name: d for d in discover()}
    cpu = measure(found["cpu"], MEASURE_BUDGET_S[size])
    if dtype in cpu.slow_dtypes:
        # The planner refuses a dtype a device has no fast matmul for, but here the dtype is fixed
        # (both sides run it): give the CPU the rate its stage will really compute at.
        from alloy import kernels
        from alloy.infer.optimize import decode_inventory

        if kernels.available():  # bf16 weights, fp32 arithmetic (alloy/infer/optimize.py)
            cpu = decode_inventory(Inventory(name="cpu", devices=[cpu]), dtype).devices[0]
            rate, how = cpu.matmul_flops[dtype], "its fp32 rate (Alloy's CPU kernels compute in fp32)"
        else:
            shape = [(64, 256, 256)] if size == "tiny" else [(256, 2048, 2048)]
            rate = matmul_flops(torch.device("cpu"), common.DTYPES[dtype], shape, MEASURE_BUDGET_S[size])
            how = f"its measured {dtype} matmul rate"
            cpu = cpu.model_copy(update={"matmul_flops": {**cpu.matmul_flops, dtype: rate},
                                         "slow_dtypes": {k: v for k, v in cpu.slow_dtypes.items() if k != dtype}})
        notes.append(f"cpu has no fast {dtype} matmul; planned with {how}, {rate / 1e9:.3g} GFLOP/s")
    if device.type == "cuda":
        gpu = measure(found["cuda:0"], MEASURE_BUDGET_S[size])
        gpu = gpu.model_copy(update={"memory_bytes": budget_bytes, "free_memory_bytes": budget_bytes})
        links = [Link(a="cpu", b="cuda:0", bandwidth_bytes_per_s=gpu.host_link_bytes_per_s or 16e9)]
    else:
        gpu = cpu.model_copy(update={"name": "capped", "memory_bytes": budget_bytes,
                                     "free_memory_bytes": budget_bytes})
        links = []
    return Inventory(name="gpu-bench", devices=[gpu, cpu], links=links)


def plan_for(spec, inv, batch: int, new: int, dtype: str):
    from alloy.plan import Workload, make_plan

    work = Workload(task="infer", batch_size=batch, seq_len=PROMPT_TOKENS, dtype=dtype, new_tokens=new)
    # One replica: a Pipeline drives one; data-parallel replicas would each need their own process.
    return make_plan(spec, inv, work, replicas=1)


def generate_timed(run, device, vocab: int, batch: int, new: int) -> tuple[dict, list[int]]:
    ids = torch.randint(1, vocab, (batch, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        run(ids, 2)  # warm-up: allocator, kernels, accelerate's hooks
        common.sync(device)
        started = time.perf_counter()
        first_row = run(ids, new)
        common.sync(device)
        elapsed_s = time.perf_counter() - started
    return {"batch": batch, "new_tokens": new, "elapsed_s": elapsed_s, "step_s": elapsed_s / new,
            "tokens_per_s": batch * new / elapsed_s}, first_row


def run_alloy(directory, plans: dict, dtype: str, new: int, reps: int, vocab: int, record, round_index: int):
    from alloy.infer import generate
    from alloy.infer.partition import Pipeline, stages_from_plan

    loaded = {}  # stage split -> stage models, shared by the batch sizes whose plans agree
    for batch, plan in plans.items():
        stages = stages_from_plan(plan)
        key = tuple(stages)
        if key not in loaded:
            loaded.clear()
            common.free(torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu"))
            loaded[key] = Pipeline.load(directory, stages, dtype=dtype).stages
        pipe = Pipeline(loaded[key], micro_batches=plan.replicas[0].micro_batches)

        def run(ids, n):
            return generate(pipe, ids.tolist(), max_new_tokens=n, eos_ids=())[0].tokens
        for rep in range(reps):
            sample, tokens = generate_timed(run, pipe.device, vocab, batch, new)
            sample.update(impl="alloy", round=round_index, rep=rep, placement=alloy_placement(plan))
            if batch == 1:
                sample["first_row_tokens"] = tokens
            record.add(sample)
    loaded.clear()


def alloy_placement(plan) -> dict:
    stages = [{"device": s.device, "layers": list(s.layers), "has_embed": s.has_embed, "has_head": s.has_head}
              for s in plan.replicas[0].stages]
    return {"stages": stages, "micro_batches": plan.replicas[0].micro_batches,
            "predicted_decode_token_s": plan.predicted.decode_token_s, "bottleneck": plan.bottleneck}


def run_accelerate(directory, max_memory: dict, dtype: torch.dtype, new: int, reps: int, vocab: int, record,
                   round_index: int):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=dtype, device_map="auto",
                                                          max_memory=max_memory).eval()
    # No hf_device_map when everything landed on one device (nothing to dispatch).
    placement = accelerate_placement(getattr(model, "hf_device_map", None) or {"": str(model.device)})

    def run(ids, n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()
    try:
        for batch in BATCHES:
            for rep in range(reps):
                sample, tokens = generate_timed(run, model.device, vocab, batch, new)
                sample.update(impl="accelerate", round=round_index, rep=rep, placement=placement)
                if batch == 1:
                    sample["first_row_tokens"] = tokens
                record.add(sample)
    finally:
        del model


def accelerate_placement(device_map: dict) -> dict:
    """{device: {"layers": [...], "modules": [...]}} from accelerate's module -> device map."""
    out: dict = defaultdict(lambda: {"layers": [], "modules": []})
    for name, dev in device_map.items():
        key = str(dev)
        parts = name.split(".")
        if "layers" in parts and parts.index("layers") + 1 < len(parts):
            out[key]["layers"].append(int(parts[parts.index("layers") + 1]))
        else:
            out[key]["modules"].append(name)
    placement = {"devices": dict(out)}
    if "cpu" in out and len(out) > 1:
        # accelerate computes "cpu" modules on its main GPU, copying their weights in at every forward.
        placement["cpu_modules_run_on"] = "the main GPU (weights copied in at every forward)"
    return placement


def main(argv=None) -> int:
    p = common.parser(__doc__, "A B rounds, each loading afresh (default 2; tiny 1)")
    p.add_argument("--reps", type=int, default=None, help="timed generations per batch size and round (default 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 32)")
    p.add_argument("--gpu-share", type=float, default=0.5,
                   help="the GPU budget as a share of the model's weight bytes (default 0.5: about half the layers)")
    args = p.parse_args(argv)
    device = common.check_args(p, args)
    if not 0 < args.gpu_share < 1:
        p.error(f"--gpu-share must be between 0 and 1 (a model that fits is no test), got {args.gpu_share}")
    size = "tiny" if args.tiny else "1b"
    rounds, reps = args.rounds or (1 if args.tiny else 2), args.reps or (1 if args.tiny else 2)
    new = args.new_tokens or (4 if args.tiny else 32)
    dtype = common.DTYPES[args.dtype]
    config = common.llama_config(size)
    record = common.Record("partition", args, size=size, config=common.SIZES[size], dtype=args.dtype,
                           prompt_tokens=PROMPT_TOKENS, new_tokens=new, rounds=rounds, reps=reps, notes=[])
    record.doc["gpu"] = common.gpu_name(device)
    with tempfile.TemporaryDirectory(prefix="alloy-gpu-bench-") as directory:
        weight_bytes = save_model(config, device, dtype, directory)
        budget_bytes = int(args.gpu_share * weight_bytes)
        record.doc.update(weight_bytes=weight_bytes, gpu_budget_bytes=budget_bytes)
        max_memory = {"cpu": 4 * weight_bytes + 4 * GIB}
        if device.type == "cuda":
            max_memory[0] = budget_bytes
            cap_bytes = budget_bytes + HEADROOM_BYTES
            if cap_bytes >= weight_bytes:
                p.error(f"a GPU cap of {cap_bytes / GIB:.2f} GiB holds the whole {weight_bytes / GIB:.2f} GiB model; "
                        "lower --gpu-share")
            total = torch.cuda.get_device_properties(device).total_memory
            record.doc.update(gpu_cap_bytes=cap_bytes, gpu_total_bytes=total)
        record.doc["max_memory"] = {str(k): v for k, v in max_memory.items()}
        accelerate_ok = importlib.util.find_spec("accelerate") is not None
        if not accelerate_ok:  # the GPU machine has it; a CPU checkout may not
            record.doc["notes"].append("accelerate is not installed: its side was skipped")
        plans = {}
        try:
            inv = inventory(device, budget_bytes, size, args.dtype, record.doc["notes"])
            spec = common.alloy_spec(config)
            plans = {batch: plan_for(spec, inv, batch, new, args.dtype) for batch in BATCHES}
            record.doc["devices"] = [d.model_dump(exclude={"layer_times"}) for d in inv.devices]
        except Exception as err:  # e.g. pydantic missing: accelerate's side still runs
            record.error("alloy plan", err)
        if device.type == "cuda":  # after measuring and saving: those ran uncapped
            torch.cuda.set_per_process_memory_fraction(cap_bytes / total, device)
        for r in record.rounds(rounds):
            for impl in IMPLS:
                try:
                    if impl == "alloy" and plans:
                        run_alloy(directory, plans, args.dtype, new, reps, config.vocab_size, record, r)
                    elif impl == "accelerate" and accelerate_ok:
                        run_accelerate(directory, max_memory, dtype, new, reps, config.vocab_size, record, r)
                except Exception as err:
                    record.error(f"round {r} {impl}", err)
                common.free(device)
    return record.finish(summary=summarize(record.doc["samples"]))


def summarize(samples: list[dict]) -> dict:
    out = {}
    for batch in BATCHES:
        by = {impl: {(s["round"], s["rep"]): s for s in samples if s["impl"] == impl and s["batch"] == batch}
              for impl in IMPLS}
        for impl in IMPLS:
            out[f"{impl}_b{batch}"] = {"tokens_per_s": common.stats([s["tokens_per_s"] for s in by[impl].values()])}
            if by[impl]:
                out[f"{impl}_b{batch}"]["placement"] = next(iter(by[impl].values()))["placement"]
        both = sorted(set(by["alloy"]) & set(by["accelerate"]))
        out[f"ratio_tokens_per_s_b{batch}"] = common.pairwise_ratios(
            [by["alloy"][k]["tokens_per_s"] for k in both], [by["accelerate"][k]["tokens_per_s"] for k in both])
    # Same weights, greedy: how many leading tokens the two agree on (bf16 rounding may part them).
    a = next((s["first_row_tokens"] for s in samples if s["impl"] == "alloy" and "first_row_tokens" in s), None)
    b = next((s["first_row_tokens"] for s in samples if s["impl"] == "accelerate" and "first_row_tokens" in s), None)
    if a is not None and b is not None:
        first_difference = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        out["greedy_prefix_agreement_b1"] = min(len(a), len(b)) if first_difference is None else first_difference
    return out


if __name__ == "__main__":
    sys.exit(main())
