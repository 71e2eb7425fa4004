"""Print the latest full-size result of each benchmark as Markdown (for docs/BENCHMARKS.md).

python -m bench.report [NAME ...]: for each benchmark, the newest bench/results/NAME-*.json that
is not a --quick run: the command, date, commit and machine it ran on, its table and headline.
Nothing is re-measured: the figures are the saved samples'.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from bench import harness
from bench.__main__ import BENCHMARKS


def latest(name: str) -> dict | None:
    for path in sorted(harness.RESULTS_DIR.glob(f"{name}-*.json"), reverse=True):
        record = json.loads(path.read_text())
        if not record.get("quick"):
            return {**record, "path": path}
    return None


def section(record: dict) -> str:
    env = record["environment"]
    rounds = max((len(v) for v in record["samples"].values()), default=0)
    head = [f"`python -m bench {record['benchmark']}` — {env['date']}, commit {env['commit']}, {env['cpu']} x "
            f"{env['cores']} cores, torch {env['torch']}; {rounds} timed round(s) "
            f"({Path(record['path']).name})", ""]
    lines = head + harness.markdown(record["benchmark"], record).splitlines()[2:]
    lines += ["", "| headline | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" for k, v in record["headline"].items()]
    module = importlib.import_module(f"bench.{record['benchmark']}") if record["benchmark"] in BENCHMARKS else None
    if hasattr(module, "report"):  # validate's full metric table, from the saved samples
        lines += ["", module.report(record["samples"])]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=sorted(BENCHMARKS))
    for name in parser.parse_args().names:
        record = latest(name)
        print(f"### {name}\n\n" + (section(record) if record else "(no full-size result saved yet)") + "\n")


if __name__ == "__main__":
    main()
