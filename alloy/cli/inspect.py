"""`alloy inspect MODEL`: the ModelSpec a model resolves to, and its size."""

from __future__ import annotations

import json

from rich.console import Console
from rich.table import Table

import alloy
from alloy.checkpoint import resolve_spec


def add_arguments(parser) -> None:
    parser.add_argument("model", help="preset name, HF model directory, or config.json path")
    parser.add_argument("--json", action="store_true", help="print the spec as JSON")
    parser.add_argument("--check", action="store_true",
                        help="also read the weights of an HF directory and check every tensor against the config")


def run(args) -> int:
    spec = resolve_spec(args.model)
    if args.check:
        model = alloy.load(args.model)
        count = sum(p.numel() for p in model.parameters())
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        print(f"{args.model}: weights OK — {count:,} parameters in {dtype}, every tensor accounted for")
    if args.json:
        print(json.dumps(spec.to_dict() | {"num_params": spec.num_params()}, indent=2))
        return 0
    table = Table(title=f"{args.model}: {spec.family}, {spec.num_params() / 1e6:,.1f}M parameters")
    table.add_column("knob")
    table.add_column("value")
    for key, value in spec.to_dict().items():
        table.add_row(key, str(value))
    Console().print(table)
    return 0
