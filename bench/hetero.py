"""Heterogeneous training: Alloy's verified plan against what users do instead, on emulated devices.

CPU workers are slices of this machine (cgroup v1 quotas as root; core sets otherwise). Each
variant is one real torchrun job over the same slices, model and global batch:
  alloy          alloy.runtime.verify: the planner's best candidates and the baselines run for a
                 few steps each, the measured-fastest kept; then a fresh run of that plan
  equal          every worker a replica with an equal batch share (DDP)
  fastest        the fastest worker alone (the others idle)
  proportional   every worker a replica, shares in proportion to its measured throughput
  solo-<dev>     one worker alone, for the solo-sum ceiling (default scenario only)

`python -m bench hetero [--quick]`: the default scenario (quotas 100/50/25) under the harness.
`python -m bench hetero --matrix [--quick]`: every scenario in SCENARIOS, one table: Alloy against
the best baseline it was compared with, and predicted against measured step time.
One measurement: python -m bench.hetero --variant alloy [--quick] [--scenario NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from alloy.devices import CpuSlice, Inventory
from alloy.devices.slice_worker import slice_name
from alloy.spec import ModelSpec

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = {  # hidden, layers, heads, kv heads, ffn, vocab, global batch, seq, steps
    "quick": (128, 4, 4, 2, 352, 2048, 7, 64, 4),
    "full": (256, 8, 8, 4, 688, 4096, 28, 128, 11),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    slices: tuple[CpuSlice, ...]
    size: str = "full"
    batch: int | None = None  # None: the size's global batch
    memory_fraction: float | None = None  # each worker may hold this fraction of what training the whole
    #                                      model on the whole batch needs: below 1 no worker trains alone
    what: str = ""


def _q(*quotas) -> tuple[CpuSlice, ...]:
    return tuple(CpuSlice(quota=q) for q in quotas)


SCENARIOS = {s.name: s for s in [
    Scenario("q100-50-25", _q(1.0, 0.5, 0.25), what="data-parallel friendly, quotas 100/50/25 %"),
    Scenario("q100-100-25", _q(1.0, 1.0, 0.25), what="two full workers and a quarter one (2.25 cores on 2)"),
    Scenario("q100-10", _q(1.0, 0.1), what="one worker that should only hurt"),
    Scenario("cores", (CpuSlice(cores=[0]), CpuSlice(cores=[1])), what="core sets instead of quotas"),
    Scenario("q100-50-25-b8", _q(1.0, 0.5, 0.25), batch=8, what="a small global batch"),
    Scenario("q100-50-25-quick", _q(1.0, 0.5, 0.25), size="quick", what="a smaller model"),
    Scenario("q100-50-mem", _q(1.0, 0.5), memory_fraction=0.7, what="memory-bound: no worker holds the model"),
]}
MATRIX_STEPS = {"quick": 14, "full": 9}  # fresh runs: the median of steps - 2 periods (quick steps are short, so more)
MATRIX_ROUNDS = {"quick": 3, "full": 1}  # quick-size runs take seconds: three rounds, the median kept
#                                         (`--matrix --quick`, a smoke test under 3 minutes, runs one)
QUICK_MATRIX = ("q100-50-25", "q100-10", "q100-50-mem")
DEFAULT = "q100-50-25"


def spec_for(size: str) -> ModelSpec:
    h, layers, heads, kv, ffn, vocab, _, _, _ = SIZES[size]
    return ModelSpec(family="llama", vocab_size=vocab, hidden_size=h, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, head_dim=h // heads, intermediate_size=ffn, max_seq_len=1024,
                     tie_embeddings=True)


def scenario_for(name: str, quick: bool) -> Scenario:
    scenario = SCENARIOS[name]
    if quick and scenario.size == "full":  # --quick: every scenario at the small size
        scenario = Scenario(scenario.name, scenario.slices, "quick", None, scenario.memory_fraction, scenario.what)
    return scenario


def workload(scenario: Scenario):
    from alloy.plan import Workload

    *_, batch, seq, _ = SIZES[scenario.size]
    return Workload("train", scenario.batch or batch, seq, dtype="fp32")


def measured_slice(piece: CpuSlice, size: str, refresh: bool = False):
    """One slice's profile with this size's per-layer times, timed from inside it (cached)."""
    from alloy.devices import DeviceProfile, measure_slice
    from alloy.runtime.layer_profile import layer_probe

    cache = RESULTS / f"hetero-slice-{slice_name(piece)}-{size}.json"
    if cache.is_file() and not refresh:
        return DeviceProfile.model_validate_json(cache.read_text())
    spec, (*_, batch, seq, _) = spec_for(size), SIZES[size]
    # the matmul rates matter little here (the layer times stand in for them): quick times them briefly
    device = measure_slice(piece, name=slice_name(piece), budget_s=0.5 if size == "quick" else 2.0,
                           probe=layer_probe(spec, seq, (1, 4, 8, batch)), timeout_s=900)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cache.write_text(device.model_dump_json(exclude_none=True))
    return device


def inventory_for(scenario: Scenario) -> Inventory:
    """The scenario's workers, measured, with the runtime's own terms calibrated on them."""
    from alloy.runtime.calibrate import calibrate

    devices = [measured_slice(piece, scenario.size) for piece in scenario.slices]
    names = [d.name for d in devices]
    devices = [d.model_copy(update={"name": f"{d.name}-{i}"}) if names.count(d.name) > 1 else d
               for i, d in enumerate(devices)]  # two slices alike: two devices
    if scenario.memory_fraction is not None:
        from alloy.plan.cost import TRAIN_WORKER_OVERHEAD_BYTES
        from alloy.plan.timing import build_problem, stage_memory_bytes

        spec, work = spec_for(scenario.size), workload(scenario)
        whole = build_problem(spec, Inventory(devices=devices), work)  # the whole model and batch on one device
        need = float(stage_memory_bytes(whole, 0, spec.num_layers, 1, work.batch_size, work.batch_size))
        # every worker pays the interpreter and torch once: the fraction is of what the model adds to that
        # (at quick size that overhead is most of the total, and 0.7 of it fitted nothing at all)
        limit = int(TRAIN_WORKER_OVERHEAD_BYTES + scenario.memory_fraction * (need - TRAIN_WORKER_OVERHEAD_BYTES))
        devices = [d.model_copy(update={"memory_bytes": limit, "free_memory_bytes": limit}) for d in devices]
    inventory = Inventory(name=f"hetero-{scenario.name}", devices=devices)
    return calibrate(inventory, spec=spec_for(scenario.size))


def run_plan(plan, scenario: Scenario, steps: int | None = None) -> dict:
    from alloy.plan.planner import layout_line
    from alloy.runtime import run

    steps = steps or SIZES[scenario.size][-1] + 1
    with tempfile.TemporaryDirectory(prefix="hetero-") as out_dir:
        report = run(plan, steps=steps, out_dir=out_dir, timeout_s=900)
    return {"tokens_per_s": report.tokens_per_s, "measured_step_s": report.measured_step_s,
            "predicted_step_s": plan.predicted.step_s,
            "prediction_error": abs(report.measured_step_s - plan.predicted.step_s) / report.measured_step_s,
            "layout": layout_line(plan)}


def measure(variant: str, scenario: Scenario) -> dict:
    """One variant of one scenario: a fresh run of its layout."""
    from alloy.plan.planner import plan_candidates
    from alloy.runtime.verify import verify

    inventory, spec, work = inventory_for(scenario), spec_for(scenario.size), workload(scenario)
    if variant == "alloy":
        started = time.perf_counter()
        plan = verify(spec, inventory, work, log=lambda line: print(line, file=sys.stderr))
        verify_s = time.perf_counter() - started
        return run_plan(plan, scenario) | {"verify_s": verify_s, "chosen": plan.verification.chosen,
                                           "trials": [t.model_dump() for t in plan.verification.trials]}
    named = dict(plan_candidates(spec, inventory, work, top=1, dedupe=False))
    if variant.startswith("solo-"):
        from alloy.plan import make_plan
        plan = make_plan(spec, inventory, work, device_names=[variant.removeprefix("solo-")], replicas=1)
    else:
        name = {"equal": "equal shares", "proportional": "proportional shares"}.get(variant, variant)
        plan = next((p for n, p in named.items() if n == name or n.startswith(name + " ")), None)
        if plan is None:  # a layout that duplicates another candidate, or does not fit: say so
            return {"skipped": 1.0}
    return run_plan(plan, scenario)


# ---- the harness interface: the default scenario, A B A B ------------------------------------------

def variants(quick: bool) -> dict[str, list[str]]:
    size = ["--quick"] if quick else []
    scenario = scenario_for(DEFAULT, quick)
    inventory_for(scenario)  # measure and calibrate once, before the timed runs
    names = ["alloy", "equal", "proportional"] + [f"solo-{slice_name(s)}" for s in scenario.slices]
    return {name: ["--variant", name, *size] for name in names}


PAIRS = [("alloy", "equal", "tokens_per_s"), ("alloy", "proportional", "tokens_per_s")]


def headline(summary: dict, machine_flops: dict) -> dict:
    fig = summary["figures"]
    alloy = fig["alloy"]["tokens_per_s"]["median"]
    solos = [f for name, f in fig.items() if name.startswith("solo-")]
    solo_sum = sum(f["tokens_per_s"]["median"] for f in solos)
    best_solo = max(f["tokens_per_s"]["median"] for f in solos)
    return {
        "alloy_tokens_per_s": alloy,
        "baseline_tokens_per_s": fig["equal"]["tokens_per_s"]["median"],
        "solo_sum_tokens_per_s": solo_sum,
        "efficiency_vs_solo_sum": alloy / solo_sum,
        "gain_vs_equal_split": summary["ratios"]["alloy/equal:tokens_per_s"]["median"],
        "gain_vs_fastest_alone": alloy / best_solo,
        "predicted_step_error": fig["alloy"]["prediction_error"]["median"],
    }


# ---- the matrix -------------------------------------------------------------------------------------

def matrix(quick: bool, log=print, progress=None) -> dict:
    """Every scenario: verify (Alloy's choice), then fresh runs of the choice and each baseline.
    `progress(rows)` is called after each scenario (the caller saves partial results)."""
    rows = []
    names = QUICK_MATRIX if quick else tuple(SCENARIOS)
    started = time.perf_counter()
    for name in names:
        scenario = scenario_for(name, quick)
        log(f"== {name} ({scenario.size}): {scenario.what}")
        try:
            row = _scenario_row(name, scenario, quick, log)
        except Exception as err:  # one broken scenario is a row that says so, not a lost matrix
            log(f"   FAILED: {type(err).__name__}: {' '.join(str(err).split())[:300]}")
            row = {"scenario": name, "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        if progress:
            progress(rows)
    done = [r for r in rows if "error" not in r]
    errors = [r["prediction_error"] for r in done]
    ratios = [r["ratio_vs_best_baseline"] for r in done if r["ratio_vs_best_baseline"]]
    summary = {"scenarios": len(rows), "failed": len(rows) - len(done),
               "min_ratio_vs_best_baseline": min(ratios) if ratios else None,
               "median_prediction_error": statistics.median(errors) if errors else None,
               "worst_prediction_error": max(errors) if errors else None,
               "seconds": time.perf_counter() - started}
    return {"rows": rows, "summary": summary}


def _scenario_row(name: str, scenario: Scenario, quick: bool, log) -> dict:
    from alloy.plan.planner import plan_candidates
    from alloy.runtime.verify import verify

    inventory, spec, work = inventory_for(scenario), spec_for(scenario.size), workload(scenario)
    verify_started = time.perf_counter()
    plan = verify(spec, inventory, work, top=2 if quick else 3, log=lambda line: log("   " + line))
    verify_s = time.perf_counter() - verify_started
    baselines = {n: p for n, p in plan_candidates(spec, inventory, work, top=1, dedupe=False)
                 if not n.startswith("alloy")}
    measured = measure_layouts({"alloy": plan} | baselines, scenario, rounds=1 if quick else None)
    best_name = max((n for n in measured if n != "alloy"), key=lambda n: measured[n]["tokens_per_s"],
                    default=None)
    alloy = measured["alloy"]
    chosen = next(t for t in plan.verification.trials if t.name == plan.verification.chosen)
    row = {"scenario": name, "size": scenario.size, "what": scenario.what, "batch": work.batch_size,
           "chosen": plan.verification.chosen, "layout": alloy["layout"],
           "alloy_tokens_per_s": alloy["tokens_per_s"],
           "best_baseline": best_name,
           "best_baseline_is_alloys_layout": best_name in alloy["same_layout_as"],
           "best_baseline_tokens_per_s": measured[best_name]["tokens_per_s"] if best_name else None,
           "ratio_vs_best_baseline": alloy["tokens_per_s"] / measured[best_name]["tokens_per_s"]
           if best_name else None,
           "predicted_step_s": chosen.predicted_step_s, "measured_step_s": alloy["measured_step_s"],
           "prediction_error": abs(alloy["measured_step_s"] - chosen.predicted_step_s) / alloy["measured_step_s"],
           "verify_s": verify_s, "measured": measured,
           "trials": [t.model_dump() for t in plan.verification.trials], "note": plan.verification.note}
    log(f"   alloy {row['alloy_tokens_per_s']:,.0f} tok/s ({row['layout']}); best baseline {best_name} "
        f"{row['best_baseline_tokens_per_s'] or 0:,.0f}; ratio {row['ratio_vs_best_baseline'] or 0:.2f}; "
        f"predicted {row['predicted_step_s']:.3g} s vs measured {row['measured_step_s']:.3g} s")
    return row


def measure_layouts(plans: dict, scenario: Scenario, rounds: int | None = None) -> dict[str, dict]:
    """A fresh run of each distinct layout, MATRIX_ROUNDS rounds in turn (A B C A B C), the median round
    kept. Names that share a layout share its runs: Alloy's choice when it *is* a baseline is the same job,
    and timing it twice would only measure noise (a 10 % gap between two runs of one 45 ms-step layout)."""
    from alloy.plan.planner import layout_key

    by_layout: dict[tuple, list[str]] = {}
    for name, plan in plans.items():
        by_layout.setdefault(layout_key(plan), []).append(name)
    steps, rounds = MATRIX_STEPS[scenario.size], rounds or MATRIX_ROUNDS[scenario.size]
    runs: dict[str, list[dict]] = {layout: [] for layout in by_layout}
    for _ in range(rounds):
        for layout, names in by_layout.items():
            runs[layout].append(run_plan(plans[names[0]], scenario, steps))
    measured = {}
    for layout, names in by_layout.items():
        kept = sorted(runs[layout], key=lambda r: r["measured_step_s"])[len(runs[layout]) // 2]
        for name in names:
            measured[name] = kept | {"rounds": len(runs[layout]), "same_layout_as": [n for n in names if n != name]}
    return measured


def matrix_markdown(result: dict) -> str:
    lines = ["| scenario | size, batch | Alloy's choice | Alloy tok/s | best baseline (tok/s) | ratio | "
             "predicted s | measured s | error |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['scenario']} | failed: {r['error'][:120]} |  |  |  |  |  |  |  |")
            continue
        best = f"{r['best_baseline']} ({r['best_baseline_tokens_per_s']:,.0f})" if r["best_baseline"] else "-"
        if r.get("best_baseline_is_alloys_layout"):
            best += ": Alloy's layout, one run"
        ratio = f"{r['ratio_vs_best_baseline']:.2f}" if r["ratio_vs_best_baseline"] else "-"
        layout = r["layout"].replace("|", "\\|")  # a layout line's bars are not table columns
        lines.append(f"| {r['scenario']} | {r['size']}, {r['batch']} | {layout} | {r['alloy_tokens_per_s']:,.0f} | "
                     f"{best} | {ratio} | {r['predicted_step_s']:.3g} | {r['measured_step_s']:.3g} | "
                     f"{r['prediction_error']:.0%} |")
    s = result["summary"]
    lines.append("")
    if s["median_prediction_error"] is not None:
        lines.append(f"lowest ratio vs best baseline {s['min_ratio_vs_best_baseline']:.2f}; prediction error median "
                     f"{s['median_prediction_error']:.0%}, worst {s['worst_prediction_error']:.0%}; "
                     f"{s['seconds'] / 60:.1f} minutes")
    if s["failed"]:
        lines.append(f"{s['failed']} scenario(s) failed")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scenario", default=DEFAULT, choices=sorted(SCENARIOS))
    args = parser.parse_args()
    print(json.dumps(measure(args.variant, scenario_for(args.scenario, args.quick))))


if __name__ == "__main__":
    main()
