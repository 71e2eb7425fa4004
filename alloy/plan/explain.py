"""A plan for people: a rich table (layout, shares, memory bars, baselines) and a PNG picture."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from alloy.errors import PlanError
from alloy.plan.plan import Plan

GIB = 2**30


def memory_bar(used_bytes: float, capacity_bytes: float, width: int = 12) -> Text:
    fraction = used_bytes / capacity_bytes
    filled = min(width, round(fraction * width))
    style = "red" if fraction > 0.9 else "yellow" if fraction > 0.7 else "green"
    return Text("█" * filled, style=style) + Text("░" * (width - filled), style="dim") + Text(
        f" {used_bytes / GIB:.1f}/{capacity_bytes / GIB:.0f} GiB")


def _route(link) -> str:
    """Where a hop's bytes go: NCCL moves them GPU to GPU; gloo between host tensors, through
    the host when an end is an accelerator."""
    if link.through_host:
        return "through the host"
    return "device to device" if link.transport == "nccl" else "host to host"


def plan_tables(plan: Plan) -> Group:
    m = plan.model
    what = (f"{plan.task} {m.family} ({m.num_params / 1e9:.2f}B params, {m.num_layers} layers), "
            f"batch {plan.batch_size} x {plan.seq_len} tokens, {plan.dtype}"
            + (", activation checkpointing" if plan.checkpointing else "")
            + (f", {plan.new_tokens} new tokens" if plan.task == "infer" else ""))
    layout = Table(title=what, title_justify="left")
    for column in ("rank", "replica", "device", "layers", "share of batch", "memory", "busy"):
        layout.add_column(column, justify="right" if column in ("rank", "busy") else "left")
    for replica in plan.replicas:
        for stage in replica.stages:
            pieces = (["embed"] if stage.has_embed else []) + [f"{stage.layers[0]}-{stage.layers[1] - 1}"] + (
                ["head"] if stage.has_head else [])
            share = (f"{replica.batch_share}/{plan.batch_size} in {replica.micro_batches} micro-batches"
                     if stage.position == 0 else "")
            layout.add_row(str(stage.rank), str(replica.index), stage.device, " + ".join(pieces), share,
                           memory_bar(stage.predicted_memory_bytes, stage.memory_capacity_bytes),
                           f"{stage.predicted_utilisation:.0%}")
            if stage.experts is not None:
                e = stage.experts
                layout.add_row(str(e.rank), str(replica.index), e.device,
                               f"experts of {e.layers[0]}-{e.layers[1] - 1} (for rank {stage.rank})", "",
                               memory_bar(e.predicted_memory_bytes, e.memory_capacity_bytes),
                               f"{e.predicted_busy_s / plan.predicted.step_s:.0%}")
    predicted = plan.predicted
    summary = Text(f"predicted step {predicted.step_s:.4g} s, {predicted.tokens_per_s:,.0f} tokens/s")
    if predicted.allreduce_s:
        summary += Text(f" (all-reduce {predicted.allreduce_s:.3g} s)")
    if predicted.prefill_s is not None:
        summary += Text(f"; prefill {predicted.prefill_s:.3g} s, {predicted.decode_token_s * 1e3:.3g} ms per token")
    summary += Text(f"\nbottleneck: {plan.bottleneck}")
    for link in plan.links:
        summary += Text(f"\nlink {link.a} <-> {link.b}: {link.transport} {_route(link)}, "
                        f"{link.message_bytes_per_element}-byte elements, {link.bytes_per_s / 1e9:.3g} GB/s, "
                        f"{link.latency_s * 1e6:.3g} us")
    if plan.collective_transport:
        summary += Text(f"\ncollectives (gradients, loss and norm): {plan.collective_transport}")
    if plan.unused_devices:
        summary += Text(f"\nunused (they would slow the step): {', '.join(plan.unused_devices)}")
    summary += Text(f"\nsearch: {plan.search.mode}, {plan.search.layouts_scored:,} layouts scored in "
                    f"{plan.search.seconds:.2f} s")

    baselines = Table(title="against today's layouts", title_justify="left")
    for column in ("method", "predicted step", "plan is faster by", "note"):
        baselines.add_column(column)
    for b in plan.baselines:
        baselines.add_row(b.name, "-" if b.step_s is None else f"{b.step_s:.4g} s",
                          "-" if b.speedup is None else f"{b.speedup:.2f}x", b.note or b.description)
    if plan.verification is None:
        return Group(layout, summary, baselines)
    return Group(layout, summary, baselines, verification_table(plan))


def verification_table(plan: Plan) -> Group:
    """Every candidate that ran before the plan was chosen: predicted against measured."""
    v = plan.verification
    table = Table(title=f"measured before committing ({v.steps} steps each, the first one warm-up)",
                  title_justify="left")
    for column in ("candidate", "layout", "predicted step", "measured step", "off by"):
        table.add_column(column)
    for t in v.trials:
        style = "bold green" if t.name == v.chosen else ""
        if t.measured_step_s is None:
            table.add_row(t.name, t.layout, f"{t.predicted_step_s:.4g} s", "failed", t.error[:60], style=style)
            continue
        off = (t.predicted_step_s - t.measured_step_s) / t.measured_step_s
        table.add_row(t.name, t.layout, f"{t.predicted_step_s:.4g} s", f"{t.measured_step_s:.4g} s", f"{off:+.0%}",
                      style=style)
    return Group(table, Text(f"chosen: {v.note}"))


def write_png(plan: Plan, path: str | Path) -> None:
    """Left: which layers each device holds. Right: one step's pipeline timeline per replica."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlanError("--png needs matplotlib: pip install 'alloy-lm[plot]'") from None
    stages = plan.stages
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 1.2 + 0.35 * len(stages)))
    colors = plt.get_cmap("tab10")
    labels = [f"r{s.replica} {s.device}" for s in stages]
    for row, s in enumerate(stages):
        left.barh(row, s.layers[1] - s.layers[0], left=s.layers[0], color=colors(s.replica % 10))
        left.text(s.layers[0] + 0.1, row, f"{s.layers[0]}-{s.layers[1] - 1}", va="center", fontsize=7)
    left.set_yticks(range(len(stages)), labels, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("transformer layers")
    left.set_title("layout")
    # 1F1B timeline, simplified: micro-batch k's work on stage s starts once stage s-1 finished it.
    row = 0
    for replica in plan.replicas:
        m = replica.micro_batches
        busy = [s.predicted_busy_s / m for s in replica.stages]
        finish = [0.0] * len(busy)
        for k in range(m):
            ready = 0.0
            for pos, dt in enumerate(busy):
                start = max(ready, finish[pos])
                right.barh(row + pos, dt, left=start, color=colors(k % 10), edgecolor="white", linewidth=0.3)
                finish[pos] = ready = start + dt
        row += len(busy)
    right.set_yticks(range(len(stages)), labels, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("seconds (one step, compute only; colour = micro-batch)")
    right.set_title(f"pipeline, predicted step {plan.predicted.step_s:.3g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
