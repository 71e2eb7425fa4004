"""`alloy demo`: the main job on a built-in default.

For now: build the tiny-llama preset, write it as a Hugging Face directory, read it back and
show that the logits agree. Planning, training and fusion join as they land.
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

import alloy
from alloy.spec import resolve_spec


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="runs/demo", help="where the demo writes (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    console = Console()
    torch.manual_seed(args.seed)
    spec = resolve_spec("tiny-llama")
    model = alloy.Transformer(spec).eval()
    console.print(f"[bold]Alloy demo[/bold]: {spec.family} spec, {spec.num_params() / 1e6:.2f}M parameters, "
                  f"{spec.num_layers} layers")
    model_dir = alloy.save(model, Path(args.out) / "model")
    console.print(f"saved as a Hugging Face directory: {model_dir}")
    loaded = alloy.load(model_dir)
    ids = torch.randint(0, spec.vocab_size, (1, 12))
    with torch.no_grad():
        before, after = model(ids), loaded(ids)
    diff = (before - after).abs().max().item()
    console.print(f"logits {list(after.shape)}; first row: {after[0, -1, :6].tolist()}")
    console.print(f"max |saved - reloaded| = {diff:.1e}")
    return 0 if diff == 0 else 1
