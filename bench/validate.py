"""Planner fidelity against published heterogeneous-cluster measurements (issue 11).

Run: python -m bench validate [--json]  (or python -m bench.validate --table for the table alone).
Every metric: predicted, published, error, threshold, pass/fail. docs/FIDELITY.md explains them.
"""

from __future__ import annotations

import argparse
import json
import time

from alloy.fidelity import require_data_root
from alloy.fidelity.validate import as_dicts, run_all


def measure() -> dict:
    started = time.perf_counter()
    metrics = as_dicts(run_all(require_data_root()))
    out = {f"m{i:02d}_{'pass' if m['passed'] else 'FAIL'}": float(m["error"] if m["error"] is not None
                                                                 else m["predicted"]) for i, m in enumerate(metrics)}
    out["passed"] = float(sum(m["passed"] for m in metrics))
    out["total"] = float(len(metrics))
    out["validate_s"] = time.perf_counter() - started
    return out


def variants(quick: bool) -> dict[str, list[str]]:
    return {"alloy": []}


PAIRS: list = []


def headline(summary: dict, machine_flops: dict) -> dict:
    return {k: v["median"] for k, v in summary["figures"]["alloy"].items()}


def table() -> str:
    rows = ["| metric | predicted | published | error | threshold | result | note |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    for m in as_dicts(run_all(require_data_root())):
        rows.append(f"| {m['name']} | {fmt(m['predicted'])} | {fmt(m['published'])} | {fmt(m['error'])} | "
                    f"{m['threshold']} | {'pass' if m['passed'] else 'FAIL'} | {m['note']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the Markdown table instead of one JSON line")
    args = parser.parse_args()
    print(table() if args.table else json.dumps(measure()))


if __name__ == "__main__":
    main()
