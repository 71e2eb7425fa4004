"""Planner fidelity against published heterogeneous-cluster measurements (issue 11).

Run: python -m bench validate [--json]  (or python -m bench.validate --table for the table alone).
Every metric: predicted, published, error, threshold, pass/fail. docs/FIDELITY.md explains them.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict

from bench.fidelity import require_data_root, sensitivity
from bench.fidelity.validate import as_dicts, run_all


ROUNDS = 1  # the metrics are deterministic; only the planning times vary, and they are reported as measured


def key(name: str) -> str:
    """A metric's name as a figure key: 'offline decode tok/s llama70b petals' -> 'offline_decode_tok_s_llama70b_petals'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def measure() -> dict:
    """Each metric's error (or its value where it has no published counterpart), the pass count, and
    every metric in full under "metrics" (kept with the raw samples, shown by `report`)."""
    started = time.perf_counter()
    metrics = as_dicts(run_all(require_data_root()))
    out: dict = {key(m["name"]): float(m["error"] if m["error"] is not None else m["predicted"]) for m in metrics}
    out["passed"] = float(sum(m["passed"] for m in metrics))
    out["total"] = float(len(metrics))
    out["validate_s"] = time.perf_counter() - started
    out["metrics"] = metrics
    out["sensitivity"] = spreads()
    return out


def spreads() -> list[dict]:
    """The spread of the missing serving checks over their unpublished inputs (`bench.fidelity.sensitivity`)."""
    return [{**asdict(s), "covers": s.covers} for s in sensitivity.run_all(require_data_root())]


def variants(quick: bool) -> dict[str, list[str]]:
    return {"alloy": []}


PAIRS: list = []


def headline(summary: dict, machine_flops: dict) -> dict:
    return {k: v["median"] for k, v in summary["figures"]["alloy"].items()}


def report(samples: dict[str, list[dict]]) -> str:
    """The full table of the last round (what `python -m bench validate` prints after the summary)."""
    last = samples["alloy"][-1]
    return table(last["metrics"]) + "\n\n" + spread_table(last.get("sensitivity", []))


def table(metrics: list[dict] | None = None) -> str:
    rows = ["| metric | predicted | published | error | threshold | result | note |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    for m in metrics if metrics is not None else as_dicts(run_all(require_data_root())):
        rows.append(f"| {m['name']} | {fmt(m['predicted'])} | {fmt(m['published'])} | {fmt(m['error'])} | "
                    f"{m['threshold']} | {'pass' if m['passed'] else 'FAIL'} | {m['note']} |")
    return "\n".join(rows)


def spread_table(rows: list[dict]) -> str:
    out = ["| prediction | varied (not published) | low | checked | high | published | inside | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['varied']} | {r['low']:.4g} | {r['checked']:.4g} | {r['high']:.4g} | "
                   f"{r['published']:.4g} | {'yes' if r['covers'] else 'no'} | {r['note']} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the Markdown table instead of one JSON line")
    args = parser.parse_args()
    print(table() + "\n\n" + spread_table(spreads()) if args.table else json.dumps(measure()))


if __name__ == "__main__":
    main()
