"""make_plan: spec + devices + workload -> Plan. Search, then describe the winner and the baselines."""

from __future__ import annotations

import time

import numpy as np

from alloy.devices import Inventory
from alloy.errors import PlanError
from alloy.plan.baselines import (baselines, equal_shares, equal_split, fastest_alone, proportional_shares,
                                  score)
from alloy.plan.cost import Workload
from alloy.plan.experts import Offload, best_offload
from alloy.plan.plan import (BaselinePrediction, ExpertPlacement, LinkUse, ModelSummary, Plan, Prediction,
                             ReplicaPlan, SearchInfo, Stage)
from alloy.plan.search import Search
from alloy.plan.timing import (Layout, Problem, Replica, build_problem, decode_token_s, hop_bytes_per_s,
                               micro_batching, pipeline_time_s, send_s, stage_memory_bytes, step_timing,
                               through_host, transport_of)
from alloy.spec import ModelSpec

GIB = 2**30


def make_plan(spec: ModelSpec, inventory: Inventory, work: Workload, device_names: list[str] | None = None,
              replicas: int | None = None, expert_offload: bool = True) -> Plan:
    """The fastest layout the search finds. `replicas` pins the data-parallel degree. For MoE
    inference, a placement of experts apart from attention (alloy.plan.experts) competes with the
    layer splits unless `expert_offload` is off."""
    started = time.perf_counter()
    problem = build_problem(spec, inventory, work, device_names)
    if replicas is not None:
        if replicas < 1 or replicas > len(problem.devices):
            raise PlanError(f"--replicas {replicas} needs between 1 and {len(problem.devices)} replicas")
        if work.batch_size < replicas:
            raise PlanError(f"batch size {work.batch_size} is smaller than the {replicas} replicas asked for; "
                            "every replica needs at least one sample")
    choices = (work.micro_batches,) if work.micro_batches else micro_batch_choices(work.batch_size)
    search = Search(problem, replicas=replicas)
    result = search.run(choices)
    offload = best_offload(problem) if expert_offload and replicas in (None, 1) else None
    if result is None:
        if offload is None:
            raise PlanError(_does_not_fit(problem))
        return describe_offload(problem, offload, search, time.perf_counter() - started)
    layout = result.layout
    if replicas is None:
        # Safety net for the heuristic mode: never hand out a plan that a baseline beats.
        for base in baselines(problem, layout.micro_batches):
            step_s, _ = score(problem, base)
            if step_s is not None and step_s < result.step_s:
                layout, result.step_s = base.layout, step_s
    if offload is not None and offload.step_s < result.step_s:
        return describe_offload(problem, offload, search, time.perf_counter() - started)
    return describe(problem, layout, result.mode, search.layouts_scored, time.perf_counter() - started)


def expert_offload_plan(spec: ModelSpec, inventory: Inventory, work: Workload,
                        device_names: list[str] | None = None) -> Plan:
    """The best expert placement alone, even where a layer split is faster (benchmarks compare them)."""
    started = time.perf_counter()
    problem = build_problem(spec, inventory, work, device_names)
    offload = best_offload(problem)
    if offload is None:
        raise PlanError("no expert placement fits: it needs an inference workload, a mixture-of-experts model "
                        "and two devices, one holding every layer's attention and the other the rest")
    return describe_offload(problem, offload, Search(problem), time.perf_counter() - started)


def describe_offload(p: Problem, off: Offload, search: Search, seconds: float) -> Plan:
    """The Plan of an expert placement: one stage on the host, its experts' rank beside it."""
    L, host, experts = p.num_layers, p.devices[off.host], p.devices[off.experts]
    base = describe(p, Layout((Replica((off.host,), (0, L), p.work.batch_size),), 1),
                    "exact" if search.exact else "heuristic", search.layouts_scored, seconds)
    placement = ExpertPlacement(rank=1, device=experts.name, layers=(off.start, L),
                                predicted_memory_bytes=off.expert_memory_bytes,
                                memory_capacity_bytes=float(p.memory_bytes[off.experts]),
                                predicted_busy_s=off.expert_busy_s)
    stage = base.stages[0].model_copy(update=dict(
        predicted_memory_bytes=off.host_memory_bytes, predicted_busy_s=off.host_busy_s,
        predicted_utilisation=off.host_busy_s / off.step_s, experts=placement))
    replica = base.replicas[0].model_copy(update=dict(predicted_time_s=off.step_s, stages=[stage]))
    used = sorted({off.host, off.experts})
    tokens = _tokens(p.work)
    baselines = [b.model_copy(update=dict(speedup=None if b.step_s is None else b.step_s / off.step_s))
                 for b in base.baselines]
    trips = off.round_trips_s / off.step_s
    own = f" and the experts of layers 0-{off.start - 1}" if off.start else ""
    bottleneck = (f"{host.name} runs attention for every layer{own}; "
                  f"{experts.name} holds the experts of layers {off.start}-{L - 1} "
                  f"({off.expert_memory_bytes / GIB:.2f} GiB) and is busy {off.expert_busy_s / off.step_s:.0%} "
                  f"of the step; the hidden states' round trips take {trips:.0%}")
    return base.model_copy(update=dict(
        devices=[p.devices[d] for d in used],
        unused_devices=[d.name for i, d in enumerate(p.devices) if i not in used],
        replicas=[replica],
        predicted=Prediction(step_s=off.step_s, tokens_per_s=tokens / off.step_s, prefill_s=off.prefill_s,
                             decode_token_s=off.decode_token_s),
        links=link_uses(p, [(off.host, off.experts)]),  # the expert round trips: one hop
        bottleneck=bottleneck, baselines=baselines))


def plan_candidates(spec: ModelSpec, inventory: Inventory, work: Workload, device_names: list[str] | None = None,
                    top: int = 3, dedupe: bool = True) -> list[tuple[str, Plan]]:
    """Layouts worth running for a few steps before committing: the search's `top` best (each
    a different grouping of devices, so device subsets are among them) and the layouts a user
    would pick instead — equal shares (DDP), the fastest device alone, proportional shares, and
    where none of those fits, one pipeline of equal layers.
    Named, fastest predicted first among the planner's, baselines after; a layout that appears
    twice is run once, under both names joined by " = " (unless `dedupe` is off). Layouts that do not fit
    are left out."""
    if work.task != "train":
        raise PlanError("only training plans are verified by running them")
    started = time.perf_counter()
    problem = build_problem(spec, inventory, work, device_names)
    choices = (work.micro_batches,) if work.micro_batches else micro_batch_choices(work.batch_size)
    search = Search(problem)
    result = search.run(choices, keep=top - 1)
    if result is None:
        raise PlanError(_does_not_fit(problem))
    seconds = time.perf_counter() - started
    named = [(f"alloy #{i + 1}", layout) for i, layout in
             enumerate([result.layout] + [layout for _, layout in result.alternatives])]
    shares = [equal_shares(problem, 1), fastest_alone(problem), proportional_shares(problem)]
    if all(score(problem, b)[0] is None for b in shares):
        # nothing trains the model on one device: the user's fallback is a pipeline of equal layers
        shares.append(equal_split(problem, max(choices)))
    named += [(b.name, b.layout) for b in shares if b.layout is not None]
    out, seen = [], {}
    for name, layout in named:
        plan = describe(problem, layout, result.mode, search.layouts_scored, seconds)
        key = layout_key(plan)
        if plan.predicted.step_s == float("inf"):
            continue
        if dedupe and key in seen:  # one run, both names: "alloy #1 = equal shares"
            index = seen[key]
            out[index] = (f"{out[index][0]} = {name}", out[index][1])
            continue
        seen[key] = len(out)
        out.append((name, plan))
    return out


def check_fits(plan: Plan, spec: ModelSpec, source: str = "plan") -> None:
    """Refuse a plan made elsewhere (or edited) whose stages overflow their devices: its layout is
    priced again here, on its own device profiles, before any worker starts."""
    work = Workload(plan.task, plan.batch_size, plan.seq_len, new_tokens=plan.new_tokens, dtype=plan.dtype,
                    micro_batches=plan.micro_batches, checkpointing=plan.checkpointing, lora_rank=plan.lora_rank,
                    quantize_base=plan.quantize_base)
    p = build_problem(spec, Inventory(name="plan", devices=plan.devices), work)
    index = {d.name: i for i, d in enumerate(p.devices)}
    for r in plan.replicas:
        missing = [s.device for s in r.stages if s.device not in index]
        if missing:
            raise PlanError(f"{source}: stage device {missing[0]!r} is not among the plan's devices")
        cuts = (r.stages[0].layers[0], *(s.layers[1] for s in r.stages))
        if cuts[0] != 0 or cuts[-1] != spec.num_layers or any(
                s.layers[0] != a or a >= b for s, a, b in zip(r.stages, cuts, cuts[1:])):
            raise PlanError(f"{source}: replica {r.index}'s stages do not cover layers 0-{spec.num_layers - 1} "
                            "in order, each once")
    timing = step_timing(p, _layout_of(plan, index))
    for r, t in zip(plan.replicas, timing.replicas):
        for stage, need in zip(r.stages, t.memory_bytes):
            have = float(p.memory_bytes[index[stage.device]])
            if need > have:
                raise PlanError(f"{source}: stage {stage.rank} on {stage.device} (layers {stage.layers[0]}-"
                                f"{stage.layers[1] - 1}) needs {need / 2**20:,.0f} MiB, the device has "
                                f"{have / 2**20:,.0f} MiB; make a new plan (alloy plan) or leave out --plan")


def reprice(plan: Plan, spec: ModelSpec, inventory: Inventory, work: Workload,
            device_names: list[str] | None = None) -> Plan:
    """The plan's layout priced again on `inventory` (the same devices, other profiles): a new Plan
    with the same stages and shares and that inventory's prediction."""
    p = build_problem(spec, inventory, work, device_names)
    layout = _layout_of(plan, {d.name: i for i, d in enumerate(p.devices)})
    priced = describe(p, layout, plan.search.mode, plan.search.layouts_scored, plan.search.seconds)
    return priced.model_copy(update={"verification": plan.verification})


def _layout_of(plan: Plan, index: dict[str, int]) -> Layout:
    """The plan document's layout over a problem's devices (`index`: device name -> position)."""
    return Layout(tuple(Replica(tuple(index[s.device] for s in r.stages),
                                (r.stages[0].layers[0], *(s.layers[1] for s in r.stages)), r.batch_share)
                        for r in plan.replicas), plan.micro_batches)


def layout_key(plan: Plan) -> tuple:
    """What the runtime runs: each replica's devices and layers, its share and micro-batches."""
    return tuple((tuple((s.device, s.layers) for s in r.stages), r.batch_share, r.micro_batches)
                 for r in plan.replicas)


def layout_line(plan: Plan) -> str:
    """One line for people: `cpu0 x5 | cpu1 0-3 > cpu2 4-7 x2`."""
    parts = []
    for r in plan.replicas:
        if len(r.stages) == 1:
            stages = r.stages[0].device
        else:
            stages = " > ".join(f"{s.device} {s.layers[0]}-{s.layers[1] - 1}" for s in r.stages)
            stages += f" ({r.micro_batches} micro-batches)"
        for s in r.stages:
            if s.experts is not None:
                a, b = s.experts.layers
                stages += f" + experts {a}-{b - 1} on {s.experts.device}"
        parts.append(f"{stages} x{r.batch_share}")
    return " | ".join(parts)


def fast_dtype(inventory: Inventory, names: list[str] | None = None) -> str:
    """The narrowest dtype every chosen device has a fast matmul path for: bf16, fp16, else fp32."""
    devices = [d for d in inventory.devices if names is None or d.name in names]
    for dtype in ("bf16", "fp16"):
        if all(dtype in d.matmul_flops and dtype not in d.slow_dtypes for d in devices):
            return dtype
    return "fp32"


def micro_batch_choices(batch_size: int) -> tuple[int, ...]:
    """Powers of two up to the batch, and the batch itself (one sample per micro-batch)."""
    choices = {batch_size}
    m = 1
    while m < batch_size:
        choices.add(m)
        m *= 2
    return tuple(sorted(choices))


def _does_not_fit(p: Problem) -> str:
    """What is missing: the least memory any layout could need against what the devices have."""
    w, L = p.work, p.num_layers
    need = float(stage_memory_bytes(p, 0, L, 1, 1, 1)) * 1.0
    have = float(p.memory_bytes.sum())
    hints = ["--dtype bf16" if w.dtype == "fp32" else None,
             "--checkpointing" if w.task == "train" and not w.checkpointing else None,
             "a smaller --batch-size or --seq-len", "more devices"]
    hint = ", ".join(h for h in hints if h)
    if need > have:
        return (f"{w.task} in {w.dtype} needs {need / GIB:.1f} GiB, the devices have {have / GIB:.1f} GiB; "
                f"try {hint}")
    largest = float(p.memory_bytes.max())
    return (f"no layout fits: the devices have {have / GIB:.1f} GiB in all (largest {largest / GIB:.1f} GiB) "
            f"but every split overflows one of them; try {hint}")


def describe(p: Problem, layout: Layout, mode: str, layouts_scored: int, seconds: float) -> Plan:
    timing = step_timing(p, layout)
    w, spec = p.work, p.spec
    replicas, rank = [], 0
    for index, (replica, t) in enumerate(zip(layout.replicas, timing.replicas)):
        stages = []
        for pos, (d, a, b) in enumerate(replica.stages()):
            busy_s = t.micro_batches * t.compute_s[pos]
            stages.append(Stage(
                rank=rank, replica=index, position=pos, device=p.devices[d].name, layers=(a, b),
                has_embed=a == 0, has_head=b == p.num_layers,
                predicted_memory_bytes=t.memory_bytes[pos], memory_capacity_bytes=float(p.memory_bytes[d]),
                predicted_busy_s=busy_s, predicted_utilisation=busy_s / timing.step_s))
            rank += 1
        replicas.append(ReplicaPlan(index=index, batch_share=replica.share, micro_batches=t.micro_batches,
                                    predicted_time_s=t.time_s, stages=stages))
    used = sorted({d for r in layout.replicas for d in r.devices})
    baseline_docs = []
    for base in baselines(p, layout.micro_batches):
        step_s, note = score(p, base)
        baseline_docs.append(BaselinePrediction(
            name=base.name, description=base.description, step_s=step_s,
            tokens_per_s=None if step_s is None else _tokens(w) / step_s,
            speedup=None if step_s is None else step_s / timing.step_s, note=note))
    return Plan(
        task=w.task,
        model=ModelSummary(family=spec.family, num_layers=spec.num_layers, hidden_size=spec.hidden_size,
                           vocab_size=spec.vocab_size, num_params=spec.num_params(),
                           max_seq_len=spec.max_seq_len, spec=spec.to_dict()),
        batch_size=w.batch_size, seq_len=w.seq_len, new_tokens=w.new_tokens if w.task == "infer" else 0,
        dtype=w.dtype, checkpointing=w.checkpointing, lora_rank=w.lora_rank, quantize_base=w.quantize_base,
        micro_batches=layout.micro_batches,
        devices=[p.devices[d] for d in used],
        unused_devices=[dev.name for i, dev in enumerate(p.devices) if i not in used],
        replicas=replicas,
        predicted=_prediction(p, layout, timing),
        bottleneck=bottleneck(p, layout, timing),
        baselines=baseline_docs,
        search=SearchInfo(mode=mode, layouts_scored=layouts_scored, seconds=seconds),
        links=link_uses(p, [r.devices for r in layout.replicas]),
        collective_transport=transport_of(p, used) if w.task == "train" and len(used) > 1 else None,
    )


def link_uses(p: Problem, pipelines) -> list[LinkUse]:
    """The plan's record of each device pair it sends between, hop by hop along each pipeline
    (a tuple of devices): the pipeline's transport, the route and the rate priced."""
    out, seen = [], set()
    for pipeline in pipelines:
        how = transport_of(p, pipeline)
        for a, b in zip(pipeline, pipeline[1:]):
            if frozenset((a, b)) in seen:
                continue
            seen.add(frozenset((a, b)))
            out.append(LinkUse(a=p.devices[a].name, b=p.devices[b].name, transport=how,
                               through_host=through_host(p, a, b, how), message_bytes_per_element=p.costs.message_bytes,
                               bytes_per_s=hop_bytes_per_s(p, a, b, how), latency_s=float(p.link_latency_s[a, b])))
    return out


def _tokens(w: Workload) -> int:
    return w.batch_size * (w.new_tokens if w.task == "infer" and w.new_tokens else w.seq_len)


def _prediction(p: Problem, layout: Layout, timing) -> Prediction:
    w = p.work
    if w.task == "train":
        return Prediction(step_s=timing.step_s, tokens_per_s=_tokens(w) / timing.step_s,
                          allreduce_s=timing.allreduce_s, startup_s=p.startup_s,
                          optimizer_s=max(t.optimizer_s for t in timing.replicas))
    # Prefill and decode split out of the combined slot times, each as its own pipeline.
    prefill_s, decode_s = 0.0, 0.0
    for replica in layout.replicas:
        m, mb, _ = micro_batching(p, replica.share, layout.micro_batches, len(replica.devices))
        stages, how = list(replica.stages()), transport_of(p, replica.devices)
        pre, dec = [], []
        for k, (d, a, b) in enumerate(stages):
            nxt = stages[k + 1][0] if k + 1 < len(stages) else None
            flops = mb * (p.prefix_step_flops[b] - p.prefix_step_flops[a]
                          + p.costs.head_step_flops_per_sample * (b == p.num_layers))
            hop_s = 0.0 if nxt is None else (mb * p.costs.boundary_bytes_per_sample / hop_bytes_per_s(p, d, nxt, how)
                                             + p.link_latency_s[d, nxt])
            pre.append(flops / p.flops[d] + hop_s)
            dec.append(float(decode_token_s(p, d, a, b, mb)) + (send_s(p, d, nxt, mb, how) - hop_s) /
                       max(w.new_tokens, 1))
        prefill_s = max(prefill_s, pipeline_time_s(pre, m))
        decode_s = max(decode_s, pipeline_time_s(dec, m))
    return Prediction(step_s=timing.step_s, tokens_per_s=_tokens(w) / timing.step_s,
                      prefill_s=prefill_s, decode_token_s=decode_s)


def bottleneck(p: Problem, layout: Layout, timing) -> str:
    """The one or two things that set the step time, in words."""
    slowest = int(np.argmax([t.time_s for t in timing.replicas]))
    replica, t = layout.replicas[slowest], timing.replicas[slowest]
    pos = int(np.argmax(t.slot_s))
    d, a, b = list(replica.stages())[pos]
    name = p.devices[d].name
    words = [f"{name} (replica {slowest}, layers {a}-{b}) paces the step at "
             f"{t.slot_s[pos] * 1e3:.3g} ms per micro-batch"]
    send = t.slot_s[pos] - t.compute_s[pos]
    if send > 0.3 * t.slot_s[pos]:
        words.append(f"{send / t.slot_s[pos]:.0%} of that is sending activations to the next stage")
    bubble = (sum(t.slot_s) - max(t.slot_s)) / timing.step_s
    if len(replica.devices) > 1 and bubble > 0.2:
        words.append(f"pipeline fill and drain take {bubble:.0%} of the step (more micro-batches shrink it)")
    if timing.allreduce_s > 0.1 * timing.step_s:
        words.append(f"the gradient all-reduce takes {timing.allreduce_s / timing.step_s:.0%} of the step")
    for replica, t in zip(layout.replicas, timing.replicas):
        for d, mem in zip(replica.devices, t.memory_bytes):
            if mem > 0.9 * p.memory_bytes[d]:
                words.append(f"memory is tight on {p.devices[d].name} ({mem / p.memory_bytes[d]:.0%} used)")
                break
    return "; ".join(words)
