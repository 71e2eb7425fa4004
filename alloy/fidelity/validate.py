"""Every fidelity check of issue 11, as data: `run_all(root)` -> list of Metric.

Nothing here is fitted to the numbers it is checked against except the per-device-type roofline
of `layer_time` (fitted on one batch size of LLaMA-2-70B, see there).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from alloy.fidelity import helix, layer_time, training
from alloy.fidelity.serving import PROMPT_TOKENS, OUTPUT_TOKENS, predict_throughput
from alloy.plan import Workload, make_plan
from alloy.plan.timing import interpolate
from alloy.spec import ModelSpec

HELIX = "Helix-ASPLOS25/artifact_evaluation/single_cluster"
DEVICE_TYPES = ("A100", "L4", "T4", "T4x4")
DECODE_BATCHES = (2, 4, 8, 16, 32)
PREFILL_TOKENS = (1000, 2000, 3000, 4000)
PLANNER_BATCHES = (64, 256, 1024)  # concurrent requests given to make_plan for offline serving


@dataclass
class Metric:
    name: str
    predicted: float
    published: float | None
    error: float | None  # relative (predicted / published - 1) or the statistic itself
    threshold: str
    passed: bool
    note: str = ""


def specs(root: Path) -> dict[str, ModelSpec]:
    return {m: ModelSpec.from_hf_config(root / HELIX / f"models/{m}/config.json") for m in ("llama70b", "llama30b")}


def measured_layer_s(root: Path, model: str, machine: str, phase: str):
    file = {"prefill": "prompt_bs2time.csv", "decode": "decode_bs2time.csv"}[phase]
    batch, ms = helix.read_layer_csv(root / "Helix-ASPLOS25/simulator/model_manager" / helix.MODEL_DIRS[model]
                                     / machine.lower() / file)
    return lambda x: interpolate(batch, [t / 1e3 for t in ms], x)


def fitted_rooflines(root: Path) -> dict[str, layer_time.Roofline]:
    spec = specs(root)["llama70b"]
    return {t: layer_time.fit_roofline(
        spec, measured_layer_s(root, "llama70b", t, "prefill")(layer_time.FIT_PREFILL_TOKENS),
        measured_layer_s(root, "llama70b", t, "decode")(layer_time.FIT_DECODE_BATCH)) for t in DEVICE_TYPES}


def per_layer_metrics(root: Path) -> list[Metric]:
    roofs, out = fitted_rooflines(root), []
    for model, spec in specs(root).items():
        points = [("decode", b, layer_time.decode_work(spec, b)) for b in DECODE_BATCHES]
        points += [("prefill", n, layer_time.prefill_work(spec, n)) for n in PREFILL_TOKENS]
        pred = {(t, ph, x): roofs[t].time_s(w) for t in DEVICE_TYPES for ph, x, w in points}
        meas = {(t, ph, x): measured_layer_s(root, model, t, ph)(x) for t in DEVICE_TYPES for ph, x, _ in points}
        errors = [pred[k] / meas[k] - 1 for k in pred]
        worst = max(errors, key=abs)
        out.append(Metric(f"per-layer time {model}: worst of {len(errors)} points", 0.0, None, worst, "|err| <= 35%",
                          abs(worst) <= 0.35, f"median |err| {np.median(np.abs(errors)):.1%}"))
        ratios = [(pred[(t, ph, x)] / pred[("A100", ph, x)]) / (meas[(t, ph, x)] / meas[("A100", ph, x)]) - 1
                  for t in DEVICE_TYPES[1:] for ph, x, _ in points]
        worst = max(ratios, key=abs)
        out.append(Metric(f"device ratio {model} (x : A100): worst of {len(ratios)}", 0.0, None, worst,
                          "|err| <= 20%", abs(worst) <= 0.20))
    return out


def inventories(root: Path, model_specs: dict) -> dict[str, object]:
    rates = {t: (r.flops, r.bytes_per_s) for t, r in fitted_rooflines(root).items()}
    machines = root / HELIX / "config/machine_profiles.ini"
    return {name: helix.helix_inventory(root, root / HELIX / f"config/{name}.ini", machines, model_specs, rates)
            for name in ("cluster24", "a100", "l4", "t4")}


def _placement(path: Path) -> dict[str, tuple[int, int]]:
    return {f"n{i}": r for i, r in helix.read_solution(path).items()}


def serving_predictions(root: Path) -> dict[tuple[str, str], tuple[float, dict]]:
    """(model, method) -> (predicted tokens/s, {sub-cluster: tokens/s} or {"bottleneck": ...})."""
    model_specs = specs(root)
    invs = inventories(root, model_specs)
    out = {}
    for model, spec in model_specs.items():
        layouts = root / HELIX / f"layout_{model}"
        for method in ("petals", "swarm", "ilp"):
            file = layouts / method / f"{method if method != 'ilp' else 'ilp'}_sol.ini"
            if method == "petals":
                file = layouts / "petals/petals_sol.ini"
            if file.is_file():
                p = predict_throughput(invs["cluster24"], spec, _placement(file))
                out[(model, "helix" if method == "ilp" else method)] = (p.tokens_per_s, {"bound": p.bound})
        # separate pipelines, and for 30B Helix's per-sub-cluster MILP placements: sum of sub-clusters
        for method, pattern in (("separate", "separate/{t}_solution_file.ini"), ("helix", "ilp/{t}/ilp_sol.ini")):
            parts = {}
            for t in ("a100", "l4", "t4"):
                file = layouts / pattern.format(t=t)
                if file.is_file():
                    parts[t] = predict_throughput(invs[t], spec, _placement(file)).tokens_per_s
            if len(parts) == 3:
                out[(model, method)] = (sum(parts.values()), parts)
    return out


def published_throughput(root: Path) -> dict[tuple[str, str], float]:
    import csv

    out = {}
    for r in csv.DictReader((root / "Helix-ASPLOS25/derived/throughput_results.csv").open()):
        if (r["kind"] == "measured_prototype" and r["mode"] == "offline" and r["subcluster"] == "all"
                and r["cluster_config"] == "single_cluster/config/cluster24.ini" and "layout" not in r["placement"]):
            out.setdefault((r["model"], r["placement"]), float(r["decode_tok_s"]))  # section 6.3 first, then 6.6
    return out


def serving_metrics(root: Path) -> list[Metric]:
    pred, pub, out = serving_predictions(root), published_throughput(root), []
    for key, measured in sorted(pub.items()):
        if key in pred:
            err = pred[key][0] / measured - 1
            out.append(Metric(f"offline decode tok/s {key[0]} {key[1]}", pred[key][0], measured, err,
                              "|err| <= 25%", abs(err) <= 0.25))
    p = {m: pred[("llama70b", m)][0] for m in ("helix", "petals", "swarm", "separate")}
    ranked = p["helix"] > p["petals"] > max(p["swarm"], p["separate"])
    out.append(Metric("ranking 70B helix > petals > swarm ~ separate", 0.0, None, None,
                      "order kept", ranked, ", ".join(f"{k} {v:.0f}" for k, v in p.items())))
    sep = pred[("llama70b", "separate")][1]
    out.append(Metric("70B separate: T4-only pipeline is the bottleneck", sep["t4"], 3.4, None,
                      "T4 lowest", min(sep, key=sep.get) == "t4", ", ".join(f"{k} {v:.0f}" for k, v in sep.items())))
    return out


def training_metrics(root: Path) -> list[Metric]:
    data, out = training.SailorData.load(root), []
    for cluster, median_max, worst_max, rho_min in (("mit", 0.20, 0.35, 0.8), ("clariden", 0.10, None, None)):
        plans = training.sailor_plans(root, cluster)
        pred = np.array([training.sailor_step_s(data, p) for p in plans])
        meas = np.array([p.measured_s for p in plans])
        err = np.abs(pred / meas - 1)
        out.append(Metric(f"Sailor {cluster}: median step-time error ({len(plans)} plans)", float(np.median(err)),
                          None, float(np.median(err)), f"<= {median_max:.0%}", np.median(err) <= median_max))
        if worst_max is not None:
            out.append(Metric(f"Sailor {cluster}: worst step-time error", float(err.max()), None, float(err.max()),
                              f"<= {worst_max:.0%}", err.max() <= worst_max))
        if rho_min is not None:
            rho = float(spearmanr(pred, meas)[0])
            out.append(Metric(f"Sailor {cluster}: Spearman rank correlation", rho, None, rho, f">= {rho_min}",
                              rho >= rho_min))
    trials = [t for t in training.amp_trials(root, "het_cluster") if t.measured_s]
    pred = [training.amp_step_s(root, t) for t in trials]
    meas = [t.measured_s for t in trials]
    rho = float(spearmanr(pred, meas)[0])
    amp_rho = float(spearmanr([t.amp_predicted_s for t in trials], meas)[0])
    out.append(Metric(f"AMP het_cluster: Spearman ({len(trials)} trials)", rho, amp_rho, rho, ">= 0.6",
                      rho >= 0.6, f"AMP's own model: {amp_rho:.2f}"))
    top = trials[int(np.argmin(pred))].measured_s
    out.append(Metric("AMP het_cluster: measured time of Alloy's top-ranked plan vs best", top, min(meas),
                      top / min(meas) - 1, "<= +10%", top / min(meas) - 1 <= 0.10))
    return out


def planner_metrics(root: Path) -> list[Metric]:
    model_specs = specs(root)
    spec, inv = model_specs["llama70b"], inventories(root, {"llama70b": model_specs["llama70b"]})["cluster24"]
    ilp = predict_throughput(inv, spec, _placement(root / HELIX / "layout_llama70b/ilp/ilp_sol.ini")).tokens_per_s
    best, seconds, notes = 0.0, 0.0, []
    for batch in PLANNER_BATCHES:
        started = time.perf_counter()
        plan = make_plan(spec, inv, Workload(task="infer", batch_size=batch, seq_len=PROMPT_TOKENS,
                                             new_tokens=OUTPUT_TOKENS, dtype="fp16"))
        seconds = max(seconds, time.perf_counter() - started)
        place = {s.device: tuple(s.layers) for r in plan.replicas for s in r.stages}
        tokens = predict_throughput(inv, spec, place).tokens_per_s
        notes.append(f"batch {batch}: {tokens:.0f} tok/s")
        best = max(best, tokens)
    return [Metric("Helix 24-node 70B: Alloy plan vs Helix MILP placement (tok/s, same model)", best, ilp,
                   best / ilp - 1, ">= MILP", best >= ilp, "; ".join(notes)),
            Metric("Helix 24-node 70B: planning time per plan (s)", seconds, 600.0, None, "< 10 s", seconds < 10)]


def run_all(root: Path) -> list[Metric]:
    return per_layer_metrics(root) + serving_metrics(root) + training_metrics(root) + planner_metrics(root)


def as_dicts(metrics: list[Metric]) -> list[dict]:
    return [{k: (bool(v) if k == "passed" else v) for k, v in asdict(m).items()} for m in metrics]
