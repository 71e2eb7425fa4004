"""Verify before committing: run the best candidate layouts and the baselines for a few real steps,
keep the one that measured fastest, and record predicted and measured time for every one.

A plan is a prediction; this is where it meets the machine. The candidates always include what
a user would do instead (equal shares, the fastest device alone, proportional shares), so the
plan that comes out is never measurably slower than any of them.
"""

from __future__ import annotations

import tempfile
from typing import Callable

from alloy.errors import AlloyError
from alloy.plan import Plan, Workload
from alloy.plan.plan import Trial, Verification
from alloy.plan.planner import layout_line, plan_candidates, reprice
from alloy.runtime.calibrate import learn, scaled_inventory, set_factors
from alloy.runtime.data import DataSource
from alloy.runtime.launch import LaunchError
from alloy.runtime.run import run
from alloy.spec import ModelSpec

VERIFY_STEPS = 6  # the median of the 4 step periods after the warm-up step
NOISE = 0.03  # measured steps this close are a tie (periods of one run spread several % on shared cores)
RUNOFF = 0.15  # the two fastest this close run once more: one short run can be a fluke of the machine


def verify(spec: ModelSpec, inventory, work: Workload, *, top: int = 3, steps: int = VERIFY_STEPS,
           device_names: list[str] | None = None, timeout_s: float = 300.0,
           log: Callable[[str], None] = lambda line: None, **run_options) -> Plan:
    """Plan, run each candidate for `steps` steps on random tokens, return the measured-fastest
    plan with every trial recorded in `plan.verification`. `run_options` go to `alloy.runtime.run`
    (precision, activation_checkpointing...) so the trials run as the real job will."""
    candidates = [(name, _priced_on_its_set(plan, spec, inventory, work, device_names))
                  for name, plan in plan_candidates(spec, inventory, work, device_names=device_names, top=top)]
    trials, reports = [], []
    for index, (name, plan) in enumerate(candidates):
        log(f"verify {index + 1}/{len(candidates)}: {name}: {layout_line(plan)} "
            f"(predicted {plan.predicted.step_s:.3g} s/step)")
        trial, report = _trial(name, plan, steps, timeout_s, run_options, log)
        trials.append(trial)
        if report is not None:
            reports.append((plan, report))
        if report is not None:
            off = report.off_term()
            log(f"  measured {trials[-1].measured_step_s:.3g} s/step" + (f"; off: {off}" if off else ""))
        else:
            log(f"  failed: {trials[-1].error}")
    ran = [(t, plan) for t, (_, plan) in zip(trials, candidates) if t.measured_step_s is not None]
    if not ran:
        raise VerifyError(f"no candidate layout ran: {trials[0].error}")
    ran = _runoff(ran, steps, timeout_s, run_options, log)
    trials = [next((t for t, _ in ran if t.name == trial.name), trial) for trial in trials]
    fastest_s = min(t.measured_step_s for t, _ in ran)
    # Trials within measurement noise of the fastest are a tie; the model, which weighs every
    # term on the same devices, breaks it (the one it predicts fastest).
    tied = [(t, p) for t, p in ran if t.measured_step_s <= fastest_s * (1 + NOISE)]
    best, plan = min(tied, key=lambda item: (item[0].predicted_step_s, item[0].measured_step_s))
    learn(inventory, reports)  # the next plan on these devices starts from what ran here
    note = _why(best, trials, inventory, device_names)
    return plan.model_copy(update={"verification": Verification(steps=steps, trials=trials, chosen=best.name,
                                                                 note=note)})


def _priced_on_its_set(plan: Plan, spec: ModelSpec, inventory, work: Workload, device_names) -> Plan:
    """A candidate priced with the compute its device set showed when it last ran together (workers
    sharing a machine slow each other: calibrate.learn), where that set has run before."""
    factors = set_factors(inventory, (s.device for r in plan.replicas for s in r.stages))
    if not factors:
        return plan
    return reprice(plan, spec, scaled_inventory(inventory, factors), work, device_names)


def _runoff(ran: list, steps: int, timeout_s: float, run_options: dict, log) -> list:
    """Run the two measured-fastest trials again when they are within RUNOFF of each other; each
    keeps the mean of its two runs. A layout that was lucky once rarely is twice."""
    if len(ran) < 2:
        return ran
    first, second = sorted(ran, key=lambda item: item[0].measured_step_s)[:2]
    if second[0].measured_step_s > first[0].measured_step_s * (1 + RUNOFF):
        return ran
    again = {}
    for trial, plan in (first, second):
        rerun, _ = _trial(trial.name, plan, steps, timeout_s, run_options, log)
        if rerun.measured_step_s is not None:
            mean_s = (trial.measured_step_s + rerun.measured_step_s) / 2
            log(f"runoff: {trial.name} measured {rerun.measured_step_s:.3g} s/step again (mean {mean_s:.3g})")
            again[trial.name] = trial.model_copy(update={"measured_step_s": mean_s})
    return [(again.get(t.name, t), p) for t, p in ran]


class VerifyError(AlloyError):
    """No candidate layout could run on these devices."""


def _trial(name: str, plan: Plan, steps: int, timeout_s: float, run_options: dict, log=lambda line: None):
    """Run one candidate; a launch that failed for a reason another try may not meet (a rendezvous
    or connection that broke, an unexpected worker exception) runs once more before the trial is
    recorded as failed. A worker's own error, a killed worker and a timeout are recorded at once."""
    common = dict(name=name, layout=layout_line(plan), devices=[d.name for d in plan.devices],
                  predicted_step_s=plan.predicted.step_s)
    for attempt in (1, 2):
        with tempfile.TemporaryDirectory(prefix="alloy-verify-") as out_dir:
            try:
                report = run(plan, steps=steps, out_dir=out_dir, data=DataSource("random", seed=0),
                             timeout_s=timeout_s, **run_options)
            except AlloyError as err:
                if attempt == 1 and isinstance(err, LaunchError) and err.may_pass_again():
                    log(f"  {name} failed ({err}); running it once more")
                    continue
                return Trial(**common, measured_step_s=None, error=str(err)), None
        return Trial(**common, measured_step_s=report.measured_step_s), report


def _why(best: Trial, trials: list[Trial], inventory, device_names) -> str:
    """Why this layout: how it measured against the others, and why any device sits idle."""
    others = [t for t in trials if t is not best and t.measured_step_s is not None]
    fastest = min([best, *others], key=lambda t: t.measured_step_s)
    if fastest is best:
        words = [f"{best.name} measured fastest ({best.measured_step_s:.3g} s/step"]
    else:
        words = [f"{best.name} measured within {NOISE:.0%} of the fastest and is predicted faster "
                 f"({best.measured_step_s:.3g} s/step"]
    if fastest is not best:
        words[0] += f"; fastest measured: {fastest.name} {fastest.measured_step_s:.3g} s"
    elif others:
        runner_up = min(others, key=lambda t: t.measured_step_s)
        words[0] += f"; next {runner_up.name} {runner_up.measured_step_s:.3g} s"
    words[0] += ")"
    available = device_names or [d.name for d in inventory.devices]
    for device in [d for d in available if d not in best.devices]:
        with_it = [t for t in others if device in t.devices]
        if with_it:
            quickest = min(with_it, key=lambda t: t.measured_step_s)
            words.append(f"{device} left out: the fastest layout using it ({quickest.name}) measured "
                         f"{quickest.measured_step_s / best.measured_step_s:.2f}x slower")
        else:
            words.append(f"{device} left out: no candidate using it was predicted to help")
    return "; ".join(words)
